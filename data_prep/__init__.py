"""data_prep: domain image sets -> verified webdataset shards, plus a built-in demo dataset.

    python -m data_prep convert --format pacs --src /data/PACS --out /data/shards/pacs
    python -m data_prep verify /data/shards/pacs --decode
    python -m data_prep index /data/shards/pacs       # version-1 manifest -> version 2 (sample offsets)
    python -m data_prep synth --out /tmp/demo_src

The trainer reads the result through :func:`data_prep.manifest.load_manifest`.
See data_prep/README.md for the shard format and every supported source layout.
"""

# Bump when the bytes written for the same input change (tar layout, key rules, image checks):
# complete shards from an older version are then rebuilt instead of reused.
# 1.1: images decoded by TorchCodec and checked against a pixel limit (see images.py).
DATA_PREP_VERSION = "1.1"

# The only split names a manifest holds; every domain lists all three (possibly empty).
SPLITS = ("train", "val", "test")
