#!/usr/bin/env bash
# Every GPU check and benchmark of this project in one call, for a lent single-GPU machine whose
# image has torch, torchvision, accelerate and transformers but not webdataset, torchcodec or
# deepspeed. Results go to $OUT (default ./gpu_out): one log per step, JSON where a step writes
# one, and summary.md. Estimated 8 minutes on an H200 (never timed yet). The whole run keeps to
# GPU_CHECKS_BUDGET_S seconds (default 540, under the device tool's 600 s per call): each step's
# timeout is cut to what is left, and a step that no longer fits is skipped and listed as such,
# so the summary always comes back. Steps run in order of what matters most: does training run
# on the GPU, do the GPU tests pass, then the speed measurements.
#
# Prepare on the dev machine (fills .whl/ with webdataset, torchcodec, deepspeed, pytest):
#   . .venv/bin/activate && bash launch/gpu_wheels.sh
# Run through the device tool with carry [".whl"] and a timeout that leaves room for a rerun:
#   WANDB_MODE=disabled bash launch/gpu_checks.sh
# Check the script itself on any machine (CPU, tiny sizes, no nvidia-smi, a few minutes; CI runs
# this through tests/test_gpu_checks.py, so a lent GPU's first minutes never go to a typo):
#   PYTHON=.venv/bin/python bash launch/gpu_checks.sh --dry-run
# Steps are independent: a failing step is recorded in summary.md and the next one runs; the
# script exits 1 if any step failed.
set -uo pipefail
dry=0
case "${1:-}" in
  --dry-run) dry=1 ;;
  "") ;;
  *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
esac
py=${PYTHON:-python3}
out=${OUT:-gpu_out}
work=${WORK:-/tmp/gpu_checks}
mkdir -p "$out" "$work"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
if ((!dry)) && compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}

# What changes in a dry run: the CPU, tiny sizes, one or two steps, no bf16, two of the RSC
# variants, and torch.compile disabled (TORCHDYNAMO_DISABLE: the step's code path runs, not the
# compiler).
if ((dry)); then
  export TORCHDYNAMO_DISABLE=1
  device=(--device cpu) amp=none rounds=(--rounds 1 --steps 1 --warmup 1) bench_size=(--resolution 32 --batch 4)
  variants=(--variants "erm,rsc_closed_form")
  synth_size=32 per_class=2 input_args=(--workers 1 --steps 2 --data.batch_size=4 --data.image_size=32
    --train.mixed_precision=no)
  launch=(--cpu --mixed_precision no) train_steps=2 pytest_args=(--collect-only)
else
  device=(--device cuda) amp=bf16 rounds=(--rounds 2 --steps 10) bench_size=(--resolution 224 --batch 256)
  variants=()
  synth_size=384 per_class=100 input_args=(--workers 8 --steps 40 --data.batch_size=128 --data.image_size=224
    --train.mixed_precision=bf16)
  launch=(--num_processes 1 --mixed_precision bf16) train_steps=100 pytest_args=()
fi

# A dry run proves every distinct command line runs; a step whose command differs from an
# earlier step's only in the architecture is listed in the summary, not run again (each costs a
# Python and torch start, and CI runs the dry run on 2 cores).
declare -A dry_repeat_of=()
((dry)) && dry_repeat_of=([bench_input_resnet50_device]=bench_input_resnet18_device
  [bench_input_resnet50_workers]=bench_input_resnet18_workers [bench_resnet18]=bench_resnet50
  [bench_timm]=bench_resnet50)

budget=${GPU_CHECKS_BUDGET_S:-540}
[[ $budget =~ ^[0-9]+$ ]] || { echo "GPU_CHECKS_BUDGET_S must be a whole number of seconds, got '$budget'" >&2; exit 2; }
summary=$out/summary.md
{ echo "# GPU checks $(date -u '+%F %T') UTC$( ((dry)) && echo ' (dry run: CPU, tiny sizes)')"
  ((dry)) || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import torch, torchvision, accelerate; print("torch", torch.__version__, "torchvision", torchvision.__version__, "accelerate", accelerate.__version__)'
} > "$summary" 2>&1

failed=0 skipped=0
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local left=$((budget - SECONDS))
  if ((left < 30)); then  # not enough left to learn anything from this step
    skipped=$((skipped + 1))
    printf '\n## %s (skipped: %ss of the %ss budget left)\n' "$name" "$((left > 0 ? left : 0))" "$budget" >> "$summary"
    return
  fi
  if [[ -n ${dry_repeat_of[$name]:-} ]]; then
    printf '\n## %s (dry run: the command of %s with another architecture, not repeated)\n' "$name" \
      "${dry_repeat_of[$name]}" >> "$summary"
    return
  fi
  ((limit <= left)) || limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  ((rc == 0)) || failed=$((failed + 1))
  # shellcheck disable=SC2016  # the backticks are Markdown, not a command substitution
  printf '\n## %s (exit %s, %ss)\n```\n%s\n```\n' "$name" "$rc" "$((SECONDS - start))" \
    "$(grep -E '^\||x ERM|mask alone|fed fraction|device path|passed|failed|error|Error|collected' "$out/$name.log" | tail -30)" >> "$summary"
}

# The trainer on one device, demo data; then the cuda-marked tests (DeepSpeed ZeRO-1/2/3;
# collected only in a dry run, where they would all skip).
step train_demo 300 "$py" -m accelerate.commands.launch "${launch[@]}" rsc_dist/train.py \
  --output_dir "$work/run" --train.max_steps=$train_steps
step pytest_cuda 240 "$py" -m pytest -q -m cuda "${pytest_args[@]}" tests

# RSC step cost with inputs already on the device (ResNet-18 and torch.compile at the end).
bench=("$py" -m rsc_dist.bench "${device[@]}" --amp "$amp" --channels-last "${rounds[@]}" "${bench_size[@]}")
step bench_resnet50 240 "${bench[@]}" --arch resnet50 "${variants[@]}" --json "$out/bench_resnet50.json"

# Input pipeline on JPEGs of a realistic size (384 px drawings), the PACS recipe: decoding in 8
# loader workers vs on the GPU (one nvJPEG batch decode + batched augmentation, issued a batch
# ahead on a side stream), ResNet-18 and ResNet-50 at 224 px, bf16, channels_last. Target:
# training from shards at >= 0.95 of the in-memory rate. The device rows also print the aten
# ops and host time per batch of the device path, and the JPEG decoder that ran.
step shards 240 bash -c "'$py' -m data_prep synth --out '$work/src' --image-size $synth_size \
  --images-per-class $per_class && '$py' -m data_prep convert --format pacs --src '$work/src' \
  --out '$work/shards' --workers 8 --no-progress"
for arch in resnet18 resnet50; do
  for decode in device workers; do
    step "bench_input_${arch}_${decode}" 200 "$py" -m rsc_dist.bench_input --config pacs_resnet18 \
      --shards "$work/shards" --decode "$decode" --model.arch="$arch" --data.classes=[] \
      --model.pretrained=null --data.flip_double=false "${input_args[@]}"
  done
done

step bench_resnet18 180 "${bench[@]}" --arch resnet18 "${variants[@]}" --json "$out/bench_resnet18.json"
step bench_resnet50_compile 300 "${bench[@]}" --arch resnet50 --compile --variants erm,rsc_closed_form \
  --json "$out/bench_resnet50_compile.json"
# RSC on a ViT's tokens (class-token head: saliency through the last block) and on a timm ConvNeXt.
step bench_timm 240 "${bench[@]}" --arch timm/vit_small_patch16_224,timm/convnext_tiny "${variants[@]}" \
  --json "$out/bench_timm.json"

cat "$summary"
((skipped == 0)) || echo "$skipped step(s) skipped: out of the ${budget}s budget (GPU_CHECKS_BUDGET_S)" >&2
((failed == 0)) || { echo "$failed step(s) failed: see $summary" >&2; exit 1; }
