#!/usr/bin/env bash
# Submit a sweep file's unfinished runs as one SLURM array job: each task is one run of
# launch/slurm/train.sbatch (checkpoint 120 s before the time limit, requeue of that task
# alone, resume in the same folder). The same as
#   python -m rsc_dist.sweep SWEEP.yaml --launcher slurm [OPTIONS]
# with the checkout's environment; the sweep file (launch/sweeps/*.yaml) is the one description
# of the sweep, whichever launcher runs it.
#
#   launch/slurm/sweep.sh launch/sweeps/pacs_resnet18.yaml --out /shared/runs/pacs_r18 \
#       --set data.root=/shared/shards/pacs --sbatch=--partition=gpu
#   launch/slurm/sweep.sh launch/sweeps/pacs_resnet18.yaml --dry-run    # print the job; submit nothing
#   python -m rsc_dist.results /shared/runs/pacs_r18 --paper           # the table, when done
#
# Options: --out DIR (default runs/NAME), --set KEY=VALUE (a fixed setting, repeatable),
# --sbatch OPT (repeatable), --max-parallel N, --dry-run (anywhere on the line: nothing is
# written or submitted). Rerunning the same command submits only the unfinished runs.
# The per-node settings of train.sbatch (NPROC_PER_NODE, RSC_DEVICE, ACCELERATE_CONFIG, ...)
# apply to every task; sbatch's own SBATCH_* variables work too (SBATCH_PARTITION, ...).
# Environment: RSC_VENV (default CHECKOUT/.venv; else python3 from PATH).
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
case $1 in -h | --help) usage 0 ;; -*) die "the first argument is the sweep file (e.g. launch/sweeps/pacs_resnet18.yaml); got $1" ;; esac
[ -f "$1" ] || die "$1: no such sweep file (sweep.sh takes a sweep file such as launch/sweeps/pacs_resnet18.yaml, which lists the preset, methods, targets and seeds)"
for arg in "$@"; do
  case $arg in --launcher | --launcher=*) die "sweep.sh always submits to SLURM; use python -m rsc_dist.sweep for other launchers" ;; esac
done
venv=${RSC_VENV:-$root/.venv}
python=python3
if [ -x "$venv/bin/python" ]; then python=$venv/bin/python; fi
export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
exec "$python" -m rsc_dist.sweep "$@" --launcher slurm
