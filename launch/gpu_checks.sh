#!/usr/bin/env bash
# Every GPU check and benchmark of this project in one call, for a lent single-GPU machine whose
# image has torch, torchvision, accelerate and transformers but not webdataset, torchcodec or
# deepspeed. Results go to $OUT (default ./gpu_out): one log and JSON per step, and summary.md.
#
# Prepare on the dev machine (fills .whl/ with webdataset, torchcodec, deepspeed, pytest):
#   . .venv/bin/activate && bash launch/gpu_wheels.sh
# Run through the device tool with carry [".whl"] and a timeout that leaves room for a rerun:
#   WANDB_MODE=disabled bash launch/gpu_checks.sh
# Steps are independent: a failing step is recorded in summary.md and the next one runs.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
summary=$out/summary.md
{ echo "# GPU checks $(date -u '+%F %T') UTC"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, torchvision, accelerate; print("torch", torch.__version__, "torchvision", torchvision.__version__, "accelerate", accelerate.__version__)'
} > "$summary" 2>&1

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  local rc=$?
  # shellcheck disable=SC2016  # the backticks are Markdown, not a command substitution
  printf '\n## %s (exit %s, %ss)\n```\n%s\n```\n' "$name" "$rc" "$((SECONDS - start))" \
    "$(grep -E '^\||x ERM|mask alone|fed fraction|passed|failed|error|Error' "$out/$name.log" | tail -30)" >> "$summary"
}

bench=(python3 -m rsc_dist.bench --device cuda --amp bf16 --channels-last --rounds 5 --steps 10)
step bench_resnet50_b256 240 "${bench[@]}" --arch resnet50 --resolution 224 --batch 256 --json "$out/bench_resnet50.json"
step bench_resnet18_b256 180 "${bench[@]}" --arch resnet18 --resolution 224 --batch 256 --json "$out/bench_resnet18.json"
step bench_resnet50_compile 300 "${bench[@]}" --arch resnet50 --resolution 224 --batch 256 --compile \
  --variants erm,rsc_closed_form --json "$out/bench_resnet50_compile.json"

# Input pipeline on JPEGs of a realistic size (384 px drawings), the PACS ResNet-50 recipe.
step shards 240 bash -c "python3 -m data_prep synth --out /tmp/gpu_src --image-size 384 --images-per-class 100 \
  && python3 -m data_prep convert --format pacs --src /tmp/gpu_src --out /tmp/gpu_shards --workers 8 --no-progress"
# Decoding in 8 loader workers vs on the GPU (nvJPEG batch decode + batched augmentation),
# ResNet-50 and ResNet-18 at 224 px, bf16, channels_last (the presets' default). Target: training
# from shards at >= 0.95 of the in-memory rate.
for arch in resnet50 resnet18; do
  for decode in workers device; do
    step "bench_input_${arch}_${decode}" 200 python3 -m rsc_dist.bench_input --config pacs_resnet18 \
      --shards /tmp/gpu_shards --workers 8 --steps 40 --decode "$decode" --model.arch="$arch" \
      --data.classes=[] --model.pretrained=null --data.batch_size=128 --data.flip_double=false \
      --data.image_size=224 --train.mixed_precision=bf16
  done
done

# The trainer on one GPU, bf16, demo data; then the cuda-marked tests (DeepSpeed ZeRO-1/2/3).
step train_demo_bf16 300 accelerate launch --num_processes 1 --mixed_precision bf16 rsc_dist/train.py \
  --output_dir /tmp/gpu_run --train.max_steps=100
step pytest_cuda 420 python3 -m pytest -q -m cuda tests
cat "$summary"
