"""The data path of a run: what it reads (plan), the global sample order (order), training and
evaluation streams and loaders (streams), decoding and augmentation (augment)."""
