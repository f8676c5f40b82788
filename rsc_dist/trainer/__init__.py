"""The trainer: assembly (build), one step, evaluation and the stop agreement (engine), the loop,
checkpoints (with ZeRO re-partitioning, zero_elastic), and CPU ranks (cpu_launch).
``rsc_dist/train.py`` is its entry point."""
