"""rsc_dist: Representation Self-Challenging (RSC, ECCV 2020) for domain generalization,
trained with Accelerate on one CPU, many GPUs or many nodes."""

__version__ = "0.1.0"
