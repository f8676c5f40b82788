"""Backbones split into ``features(x) -> z`` and ``head(z) -> logits``: torchvision's (backbones,
heads) and any timm model (timm_backbones); their pretrained weights from local files only
(weights, timm_weights); where z keeps its channels and locations (layouts); and the network that
joins them (network, build)."""
