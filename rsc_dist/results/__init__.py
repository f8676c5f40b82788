"""Runs' results.json files into the paper's tables (``python -m rsc_dist.results``): per-run
tables (tables) and selection across a sweep's trials (sweep_select)."""
