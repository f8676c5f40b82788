#!/usr/bin/env bash
# The per-node half of train.sbatch: started once per node by `srun --ntasks-per-node=1`, it
# runs `accelerate launch --machine_rank $SLURM_NODEID "$@"` and carries stop signals to the
# trainer ranks. Not meant to be run by hand.
#
# Signals. Slurm delivers a signal sent to a step (srun forwarding the batch script's USR1,
# `scancel --signal=USR1 JOB`) to EVERY process of the step: this script, the accelerate
# launcher (the torchrun agent) and the ranks. The ranks handle USR1 (checkpoint at the next
# step boundary, exit 75), but the launcher does not: Python's default for USR1 is to die,
# which would kill the ranks mid-save. So the launcher starts with USR1 ignored (an ignored
# signal stays ignored across exec; the trainer installs its own handler, which replaces that).
# Where only this script is signalled, the trap below forwards the signal to the ranks, the
# launcher's direct children. SIGTERM (scancel, preemption) reaches everything as usual; the
# launcher forwards it to the ranks too and gives them 30 s.
#
# Network interfaces: GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME reach the ranks as the job's
# environment has them (exported at submission, or set per node by the site, e.g. a TaskProlog);
# this script never sets them, it only logs them when they are set.
#
# Exit status: the launcher's, except that a run stopped by a signal reports 75 whatever the
# launcher says: torchrun turns a rank's 75 into its own 1, so the launcher cannot tell a clean
# stop from a crash. train.sbatch requeues after a stop it asked for or one the trainer reports
# (OUTPUT_DIR/preempted.json), never after a crash.
set -uo pipefail
# The trainer's "stopped after a checkpoint, resume me" exit code (rsc_dist/core/contracts.py).
EXIT_PREEMPTED=75

: "${SLURM_NODEID:?node_launch.sh runs under srun (SLURM_NODEID unset)}"

for var in GLOO_SOCKET_IFNAME NCCL_SOCKET_IFNAME; do
  if [ -n "${!var:-}" ]; then
    echo "[node_launch $(hostname -s) node $SLURM_NODEID] $var=${!var}" >&2
  fi
done

(
  trap '' USR1
  exec "${RSC_ACCELERATE:-accelerate}" launch --machine_rank "$SLURM_NODEID" "$@"
) &
launcher=$!
stopped_by=""

# shellcheck disable=SC2317  # only reached through the traps below
forward() {
  stopped_by=$1
  echo "[node_launch $(hostname -s) node $SLURM_NODEID] SIG$1: forwarding to the trainer ranks" >&2
  pkill "-$1" -P "$launcher" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# `wait` returns early when a trapped signal arrives; keep waiting until the launcher is gone.
wait "$launcher"
rc=$?
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher"
  rc=$?
done

if [ "$rc" -ne 0 ] && [ -n "$stopped_by" ]; then
  echo "[node_launch $(hostname -s) node $SLURM_NODEID] launcher exited $rc after SIG$stopped_by: reporting $EXIT_PREEMPTED (stopped, resume me)" >&2
  rc=$EXIT_PREEMPTED
fi
exit "$rc"
