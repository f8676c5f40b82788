"""Sweeps: one YAML file describes methods x targets x hyperparameter trials x seeds; launchers
run it here (local), on SLURM (an array job) or through W&B agents; rsc_dist.results selects
across trials as DomainBed does. Entry point: ``python -m rsc_dist.sweep`` (cli.py).

    schema.py        the sweep file's keys, typed (read by the config machinery)
    spec.py          its validation and deterministic expansion into runs (protocol paired | domainbed)
    domainbed.py     DomainBed's protocol: its registry, draws per (hparams seed, trial seed), run seeds
    dataset.py       the dataset's domains and classes, checked before anything runs
    space.py         grid axes, seeded distributions, the per-method default spaces
    state.py         which runs are finished, started or new (and finished with other settings)
    launch_local.py  a queue on this machine: K runs at once, GPUs or CPU threads, clean stops
    launch_slurm.py  one array job of launch/slurm/train.sbatch
    launch_wandb.py  a W&B sweep config whose trials are the same runs
"""
