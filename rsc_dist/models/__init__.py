"""Backbones split into ``features(x) -> z`` and ``head(z) -> logits``, and the network that
joins them."""
