"""Same input, same bytes; interrupted or repeated runs finish the job and reuse complete shards."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from data_prep.convert import convert
from data_prep.manifest import load_manifest
from data_prep.verify import verify
from support.data_prep_samples import image_bytes, make_pacs, tree_bytes, write


@pytest.fixture
def pacs(tmp_path) -> Path:
    src = tmp_path / "PACS"
    make_pacs(src, per_class=5)
    write(src / "kfold/photo/dog/img1.jpg", image_bytes("bmp", seed=9))  # a re-encoded image must be stable too
    return src


def _convert(src: Path, out: Path, **options):
    options.setdefault("workers", 1)
    options.setdefault("shard_samples", 2)
    return convert("pacs", src, out, progress=False, **options)


def test_two_runs_give_identical_bytes_whatever_the_worker_count(pacs, tmp_path):
    _convert(pacs, tmp_path / "a", workers=1)
    _convert(pacs, tmp_path / "b", workers=2)
    first, second = tree_bytes(tmp_path / "a"), tree_bytes(tmp_path / "b")
    assert first.keys() == second.keys() and first == second
    assert any(name.endswith(".tar") for name in first)


def test_seed_changes_holdout_and_order_only_through_the_seed(tmp_path):
    from support.data_prep_samples import make_class_tree

    make_class_tree(tmp_path / "src", ["a", "b"], ["x", "y"], 6)
    convert("imagefolder", tmp_path / "src", tmp_path / "s0", seed=0, workers=1, progress=False)
    convert("imagefolder", tmp_path / "src", tmp_path / "s0_again", seed=0, workers=1, progress=False)
    convert("imagefolder", tmp_path / "src", tmp_path / "s1", seed=1, workers=1, progress=False)
    assert tree_bytes(tmp_path / "s0") == tree_bytes(tmp_path / "s0_again")
    assert tree_bytes(tmp_path / "s0") != tree_bytes(tmp_path / "s1")


def test_rerun_reuses_every_complete_shard(pacs, tmp_path):
    first = _convert(pacs, tmp_path / "out")
    before = tree_bytes(tmp_path / "out")
    again = _convert(pacs, tmp_path / "out")
    assert again.reused_shards == first.num_shards and tree_bytes(tmp_path / "out") == before


def test_interrupted_run_is_completed_by_a_rerun(pacs, tmp_path):
    _convert(pacs, tmp_path / "reference")
    out = tmp_path / "out"
    _convert(pacs, out)
    # Simulate a crash mid-way: the manifest not yet written, one shard never renamed into place,
    # another half-written under its temporary name, one cut short by a dying disk.
    manifest = load_manifest(out)
    (out / "_info.json").unlink()
    missing, partial, damaged = (manifest.root / s.file for s in manifest.shards("photo", "train")[:3])
    missing.unlink()
    partial.rename(partial.with_name(f".{partial.name}.12345.tmp"))
    damaged.write_bytes(damaged.read_bytes()[:700])
    summary = _convert(pacs, out)
    assert summary.reused_shards == summary.num_shards - 3
    assert tree_bytes(out) == tree_bytes(tmp_path / "reference")
    assert verify(out, progress=False) == []


def test_changed_source_rebuilds_only_its_shard_and_stale_shards_go(pacs, tmp_path):
    out = tmp_path / "out"
    first = _convert(pacs, out, shard_samples=1)
    image = pacs / "kfold/photo/horse/img2.jpg"
    image.write_bytes(image_bytes(seed=77))
    os.utime(image, ns=(1, 1))
    assert _convert(pacs, out, shard_samples=1).reused_shards == first.num_shards - 1
    assert (out / "photo/train-000005.tar").exists()
    _convert(pacs, out, shard_samples=4)
    assert not (out / "photo/train-000005.tar").exists()  # planned before, not now: removed
    _convert(pacs, tmp_path / "fresh", shard_samples=4)
    assert tree_bytes(out) == tree_bytes(tmp_path / "fresh")


def test_shards_close_at_the_sample_or_byte_limit():
    from data_prep.plan import PlannedSample, cut_into_shards
    from data_prep.records import SourceRecord
    from data_prep.tarshard import estimated_sample_bytes

    samples = [PlannedSample(SourceRecord(Path(f"/x/{i}.jpg"), f"{i}.jpg", "d", 0, "train", str(i)), str(i), 0,
                             size, 0) for i, size in enumerate([100, 5000, 100, 100, 20000, 100])]
    by_count = cut_into_shards(samples, domain="d", split="train", shard_samples=4, shard_bytes=10**9)
    assert [len(job.samples) for job in by_count] == [4, 2]
    limit = 10240 + estimated_sample_bytes(5000, "1.jpg") + 2 * estimated_sample_bytes(100, "0.jpg")
    by_bytes = cut_into_shards(samples, domain="d", split="train", shard_samples=100, shard_bytes=limit)
    assert [len(job.samples) for job in by_bytes] == [3, 1, 1, 1]  # 20000 alone exceeds the limit: own shard
    assert [job.file for job in by_bytes][-1] == "d/train-000003.tar"
