#!/usr/bin/env bash
# Submit one SLURM array job over algorithm x target domain x seed for a preset; each run in
# its own folder RUNS/SWEEP/ALGORITHM/TARGET/seedK, all in the W&B group SWEEP.
#
#   launch/slurm/sweep.sh pacs_resnet18 --sbatch=--gpus-per-node=1 --sbatch=--time=8:00:00
#   launch/slurm/sweep.sh pacs_resnet18 --seeds 0,1,2 --algorithms rsc,erm --targets sketch -- --data.root=/shared/pacs
#   launch/slurm/sweep.sh demo --dry-run          # print the sbatch command and every run
#   python -m rsc_dist.results runs/SWEEP         # the table, when the runs are done
#
# Options:
#   --seeds LIST         comma-separated seeds (default 0,1,2)
#   --algorithms LIST    (default rsc,erm)
#   --targets LIST       held-out domains (default: all domains of the preset's dataset; "none"
#                        keeps the preset's own target, e.g. imagenet_resnet50 -> ImageNet-Sketch)
#   --name NAME          sweep name: job name, W&B group, folder (default PRESET-YYYYmmdd-HHMMSS)
#   --runs DIR           parent of the sweep folder (default $RSC_RUNS, else ./runs)
#   --max-parallel N     at most N tasks running at once (--array=...%N)
#   --sbatch OPT         one extra sbatch option, repeatable: --sbatch=--partition=gpu
#   --dry-run            print what would be submitted; write and submit nothing
#   -- ARGS...           passed to every run of the trainer (after the preset)
# The per-node settings of train.sbatch (NPROC_PER_NODE, RSC_DEVICE, ACCELERATE_CONFIG, ...)
# apply to every task; sbatch's own SBATCH_* variables work too (SBATCH_PARTITION, ...).
#
# Resuming a sweep: run the same command with the same --name. Runs that have a results.json
# are skipped; the others are submitted again and continue from their newest checkpoint.
set -euo pipefail

die() {
  echo "sweep.sh: $*" >&2
  exit 2
}
usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
  exit "${1:-0}"
}

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
[ $# -ge 1 ] || usage 2
case $1 in -h | --help) usage 0 ;; -*) die "the first argument is the preset (e.g. pacs_resnet18); got $1" ;; esac
preset=$1
shift

seeds=0,1,2
algorithms=rsc,erm
targets=""
name=""
runs=${RSC_RUNS:-$PWD/runs}
max_parallel=""
dry_run=0
sbatch_extra=()
trainer_extra=()
while [ $# -gt 0 ]; do
  case $1 in
    --seeds | --algorithms | --targets | --name | --runs | --max-parallel | --sbatch)
      [ $# -ge 2 ] || die "$1 needs a value"
      opt=${1#--}
      val=$2
      shift 2
      ;;
    --seeds=* | --algorithms=* | --targets=* | --name=* | --runs=* | --max-parallel=* | --sbatch=*)
      opt=${1%%=*}
      opt=${opt#--}
      val=${1#*=}
      shift
      ;;
    --dry-run)
      dry_run=1
      shift
      continue
      ;;
    -h | --help) usage 0 ;;
    --)
      shift
      trainer_extra=("$@")
      break
      ;;
    *) die "unknown option $1 (trainer arguments go after --)" ;;
  esac
  case $opt in
    seeds) seeds=$val ;;
    algorithms) algorithms=$val ;;
    targets) targets=$val ;;
    name) name=$val ;;
    runs) runs=$val ;;
    max-parallel) max_parallel=$val ;;
    sbatch) sbatch_extra+=("$val") ;;
  esac
done

# Held-out domains per dataset (folder names as data_prep writes them).
preset_base=$(basename "$preset" .yaml)
if [ -z "$targets" ]; then
  case $preset_base in
    demo*) targets=photo,cartoon,sketch,painting ;;
    pacs* | domainbed_pacs*) targets=art_painting,cartoon,photo,sketch ;;
    vlcs*) targets=Caltech101,LabelMe,SUN09,VOC2007 ;;
    officehome* | office_home*) targets=Art,Clipart,Product,Real_World ;;
    imagenet*) targets=none ;;
    *) die "no default target domains for preset '$preset': pass --targets a,b,..." ;;
  esac
fi
IFS=, read -r -a seed_list <<<"$seeds"
IFS=, read -r -a algorithm_list <<<"$algorithms"
IFS=, read -r -a target_list <<<"$targets"
for s in "${seed_list[@]}"; do [[ $s =~ ^[0-9]+$ ]] || die "--seeds: '$s' is not a non-negative integer"; done
for a in "${algorithm_list[@]}"; do [[ $a =~ ^(rsc|erm)$ ]] || die "--algorithms: '$a' is not rsc or erm"; done
for t in "${target_list[@]}"; do [[ $t =~ ^[A-Za-z0-9_.+-]+$ ]] || die "--targets: '$t' is not a domain name"; done
[ -z "$max_parallel" ] || [[ $max_parallel =~ ^[1-9][0-9]*$ ]] || die "--max-parallel: '$max_parallel' is not a positive integer"
if [ ${#seed_list[@]} -eq 0 ] || [ ${#algorithm_list[@]} -eq 0 ] || [ ${#target_list[@]} -eq 0 ]; then
  die "empty --seeds, --algorithms or --targets"
fi

name=${name:-$preset_base-$(date +%Y%m%d-%H%M%S)}
[[ $name =~ ^[A-Za-z0-9_.+-]+$ ]] || die "--name: '$name' may only hold letters, digits and _ . + -"
runs=$(realpath -m "$runs")
sweep_dir=$runs/$name
task_file=$sweep_dir/tasks-$(date +%Y%m%d-%H%M%S).tsv

# One line per array task: its extra trainer arguments, tab-separated (read by train.sbatch).
lines=()
skipped=0
for a in "${algorithm_list[@]}"; do
  for t in "${target_list[@]}"; do
    for s in "${seed_list[@]}"; do
      folder=$t
      target_args=("--data.target=$t")
      if [ "$t" = none ]; then
        folder=default
        target_args=()
      fi
      out=$sweep_dir/$a/$folder/seed$s
      if [ -f "$out/results.json" ]; then
        skipped=$((skipped + 1))
        continue
      fi
      task=("--algorithm=$a" "${target_args[@]}" "--run.seed=$s" "--wandb.group=$name"
        "--run.name=$name-$a-$folder-seed$s" --output_dir "$out")
      lines+=("$(IFS=$'\t'; echo "${task[*]}")")
    done
  done
done
n=${#lines[@]}

echo "# sweep $name: ${#algorithm_list[@]} algorithm(s) x ${#target_list[@]} target(s) x ${#seed_list[@]} seed(s) under $sweep_dir" \
  "($n to run, $skipped already finished)"
if [ "$n" -eq 0 ]; then
  echo "# nothing to submit; the table: python -m rsc_dist.results $sweep_dir"
  exit 0
fi
cmd=(sbatch --parsable "--job-name=$name" "--array=0-$((n - 1))${max_parallel:+%$max_parallel}"
  "--output=$sweep_dir/logs/%x-%A_%a.out" "${sbatch_extra[@]}"
  "$root/launch/slurm/train.sbatch" --config "$preset" "${trainer_extra[@]}")

if [ "$dry_run" = 1 ]; then
  echo "# --dry-run: nothing written or submitted; the task file would hold the task lines below"
  printf 'RSC_TASK_FILE=%q RSC_ROOT=%q ' "$task_file" "$root"
  printf '%q ' "${cmd[@]}"
  echo
  for i in "${!lines[@]}"; do
    IFS=$'\t' read -r -a task <<<"${lines[i]}"
    printf '# task %d: train.py ' "$i"
    printf '%q ' --config "$preset" "${trainer_extra[@]}" "${task[@]}" --resume auto
    echo
  done
  exit 0
fi

command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
mkdir -p "$sweep_dir/logs" || die "cannot create $sweep_dir/logs"
printf '%s\n' "${lines[@]}" >"$task_file"
export RSC_TASK_FILE=$task_file RSC_ROOT=$root
job=$("${cmd[@]}")
echo "$job" >>"$sweep_dir/array_jobs.txt"
echo "submitted array job $job ($n tasks); task list $task_file; logs $sweep_dir/logs/"
echo "when done: python -m rsc_dist.results $sweep_dir"
