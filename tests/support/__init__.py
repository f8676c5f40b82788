"""Helpers shared by the tests: tiny data and configs, launches, ranks, SLURM and network
namespaces, W&B records. Test modules import from here, never from each other."""
