"""Backbones split into ``features(x) -> z`` and ``head(z) -> logits`` (backbones, heads), their
pretrained weights from local files (weights), and the network that joins them (network, build)."""
