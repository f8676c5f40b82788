"""The demo dataset: deterministic synthesis in the PACS layout, and ensure_demo_shards idempotence."""
from __future__ import annotations

import os

from data_prep.demo import ensure_demo_shards
from data_prep.manifest import load_manifest
from data_prep.synth import DOMAINS, write_demo_dataset
from data_prep.synth_shapes import CLASSES
from data_prep.testing import tree_bytes
from data_prep.verify import verify

SMALL = dict(image_size=16, images_per_class=5)


def test_synth_is_deterministic_and_pacs_shaped(tmp_path):
    write_demo_dataset(tmp_path / "a", **SMALL)
    write_demo_dataset(tmp_path / "b", **SMALL)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    for domain in DOMAINS:
        test_lines = (tmp_path / "a" / f"{domain}_test_kfold.txt").read_text().splitlines()
        crossval = (tmp_path / "a" / f"{domain}_crossval_kfold.txt").read_text().splitlines()
        train = (tmp_path / "a" / f"{domain}_train_kfold.txt").read_text().splitlines()
        assert sorted(test_lines) == sorted(train + crossval) and len(test_lines) == 5 * len(CLASSES)
        assert len(crossval) == len(CLASSES)  # 20% of 5 per class
    assert (tmp_path / "a/kfold/photo/star/photo_star_0000.jpg").read_bytes()[:3] == b"\xff\xd8\xff"


def test_ensure_demo_shards_builds_once_and_reuses(tmp_path):
    root = ensure_demo_shards(tmp_path / "cache", **SMALL)
    manifest = load_manifest(root)
    assert manifest.domains == tuple(sorted(DOMAINS)) and manifest.classes == tuple(CLASSES)
    assert sum(manifest.num_samples(d) for d in manifest.domains) == 4 * 6 * 5
    assert verify(root, decode=True, progress=False) == []
    stamp = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert ensure_demo_shards(tmp_path / "cache", **SMALL) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == stamp  # nothing rewritten


def test_ensure_demo_shards_recovers_from_an_interruption(tmp_path):
    root = ensure_demo_shards(tmp_path / "cache", **SMALL)
    reference = tree_bytes(root, with_state=False)
    (root / "_info.json").unlink()  # as if killed before the manifest was written
    next(root.glob("sketch/train-*.tar")).unlink()
    (root.parent / "src" / "_synth.json").unlink()  # and the source set as if never finished
    (root.parent / ".src.999.tmp").mkdir()  # a leftover temporary folder
    assert ensure_demo_shards(tmp_path / "cache", **SMALL) == root
    assert tree_bytes(root, with_state=False) == reference
    assert not (root.parent / ".src.999.tmp").exists()


def test_other_parameters_get_their_own_folder(tmp_path):
    small = ensure_demo_shards(tmp_path / "cache", **SMALL)
    other = ensure_demo_shards(tmp_path / "cache", image_size=16, images_per_class=5, seed=1)
    assert small != other and os.path.isdir(small) and os.path.isdir(other)
