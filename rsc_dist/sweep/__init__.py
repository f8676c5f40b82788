"""Sweeps: one YAML file describes methods x targets x hyperparameter trials x seeds; launchers
run it here (local), on SLURM (an array job) or through W&B agents; ``select`` picks across
trials with DomainBed's protocol. Entry point: ``python -m rsc_dist.sweep`` (cli.py).

    spec.py          the sweep file, its validation and deterministic expansion into runs
    space.py         grid axes, seeded distributions, the per-method default spaces
    state.py         which runs are finished, started or new (and finished with other settings)
    launch_local.py  a queue on this machine: K runs at once, GPUs or CPU threads, clean stops
    launch_slurm.py  one array job of launch/slurm/train.sbatch
    launch_wandb.py  a W&B sweep config whose trials are the same runs
"""
