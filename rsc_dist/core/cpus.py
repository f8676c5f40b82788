"""How many CPU threads a process gets: the cores it may use divided by the processes that share
them. One rule for the trainer's ranks (rsc_dist.trainer.build.cpu_threads) and the sweep's runs
(rsc_dist.sweep.launch_local)."""

from __future__ import annotations

import os


def cpu_cores() -> int:
    """The cores this process may run on: its affinity mask (what taskset, cgroups and SLURM's
    task affinity leave it), else every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_per_process(cores: int, processes: int) -> int:
    """Each of ``processes`` processes sharing ``cores`` cores gets an equal whole share (at least 1)."""
    return max(1, cores // max(1, processes))
