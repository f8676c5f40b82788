"""Weight averaging beside the trained model: EMA, SWA and SWAD inside a run, for every method.

- ``settings``: the ``averaging`` config section (``train.averaging`` switches it on).
- ``rules``: the pure rules: timm's EMA decay with warm-up, SWAD's loss-valley window.
- ``fragments``: where each rank's share of the trained fp32 weights lives (the whole
  parameters on one process and under DDP, the rank's partition of the fp32 master weights
  under DeepSpeed ZeRO), and how whole tensors are made from the shares.
- ``averager``: the averaged weights and their state, updated after every optimizer step.
- ``batchnorm``: BatchNorm statistics of an averaged model recomputed over the global batch.
- ``soups``: averages across runs (uniform and greedy soups; ``python -m rsc_dist.soup``).
"""
