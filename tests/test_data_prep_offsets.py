"""Manifest format_version 2: per-sample byte offsets, the span parser, reuse, and `index` for version 1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep.convert import convert
from data_prep.index import index_manifest
from data_prep.manifest import FORMAT_VERSION, ManifestError, load_manifest, write_manifest
from data_prep.shard_writer import STATE_DIR
from data_prep.tarshard import (
    TAR_BLOCK,
    iter_tar_samples,
    parse_sample_span,
    sample_members,
    scan_sample_offsets,
    write_tar,
)
from support.data_prep_samples import image_bytes, make_pacs


@pytest.fixture
def shards(tmp_path) -> Path:
    make_pacs(tmp_path / "PACS", per_class=5)
    out = tmp_path / "out"
    convert("pacs", tmp_path / "PACS", out, workers=1, progress=False, shard_samples=3)
    return out


def _all_shards(root: Path):
    manifest = load_manifest(root)
    return [(manifest.root / s.file, s) for d in manifest.domains for split in manifest.splits[d]
            for s in manifest.shards(d, split)]


def test_offsets_delimit_every_sample_exactly(shards):
    assert load_manifest(shards).format_version == FORMAT_VERSION == 2
    for path, shard in _all_shards(shards):
        offsets = shard.sample_offsets
        assert list(offsets) == scan_sample_offsets(path) and len(offsets) == shard.num_samples + 1
        data = path.read_bytes()
        assert offsets[0] == 0 and data[offsets[-1]:] == bytes(len(data) - offsets[-1])  # only end blocks after
        from_spans = [parse_sample_span(data[offsets[i]:offsets[i + 1]]) for i in range(shard.num_samples)]
        assert from_spans == list(iter_tar_samples(path))
        start, end = shard.sample_span(1)
        with open(path, "rb") as handle:  # what the trainer does: seek and read one sample
            handle.seek(start)
            assert parse_sample_span(handle.read(end - start)) == from_spans[1]


def test_write_tar_offsets_match_the_scan_with_long_names_and_empty_members(tmp_path):
    members = (sample_members("k" * 95, "jpg", b"x" * 1000, label=1, domain_index=0, src="a/b.jpg")
               + sample_members("k2", "png", b"", label=2, domain_index=0, src="s" * 300)
               + sample_members("k3", "webp", b"y" * 512, label=0, domain_index=3, src="c"))
    offsets = write_tar(tmp_path / "a.tar", members)
    assert offsets == scan_sample_offsets(tmp_path / "a.tar") and len(offsets) == 4
    assert offsets[1] == 512 + 1024 + 3 * 1024  # jpg (2 blocks of data) + three one-block members


def _span(tmp_path) -> bytes:
    members = sample_members("k1", "jpg", image_bytes(), label=1, domain_index=0, src="a.jpg")
    offsets = write_tar(tmp_path / "one.tar", members)
    return (tmp_path / "one.tar").read_bytes()[offsets[0]:offsets[1]]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "padding is cut short"),
    (lambda b: b[:300], "header at byte 0 is cut short"),
    (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:], "bad tar header at byte 0"),
    (lambda b: b + bytes(TAR_BLOCK), "zero block at byte"),
    (lambda b: b[:TAR_BLOCK] + b[TAR_BLOCK:2 * TAR_BLOCK], "needs"),
    (lambda b: b"", "empty"),
])
def test_parse_sample_span_names_the_problem(tmp_path, damage, message):
    span = _span(tmp_path)
    assert parse_sample_span(span)["cls"] == b"1"
    with pytest.raises(ValueError, match=message):
        parse_sample_span(damage(span))


def test_parse_sample_span_refuses_two_samples(tmp_path):
    members = (sample_members("k1", "jpg", b"a", label=1, domain_index=0, src="a")
               + sample_members("k2", "jpg", b"b", label=1, domain_index=0, src="b"))
    offsets = write_tar(tmp_path / "two.tar", members)
    data = (tmp_path / "two.tar").read_bytes()
    with pytest.raises(ValueError, match="does not belong to sample 'k1'"):
        parse_sample_span(data[offsets[0]:offsets[2]])


def test_state_files_keep_offsets_and_reused_shards_keep_them(shards, tmp_path):
    before = (shards / "_info.json").read_bytes()
    states = sorted((shards / STATE_DIR).rglob("*.json"))
    assert states and all("sample_offsets" in json.loads(p.read_text()) for p in states)
    summary = convert("pacs", tmp_path / "PACS", shards, workers=1, progress=False, shard_samples=3)
    assert summary.reused_shards == summary.num_shards and (shards / "_info.json").read_bytes() == before
    for state in states:  # a state written before offsets existed: the shard is reused, offsets scanned
        raw = json.loads(state.read_text())
        del raw["sample_offsets"]
        state.write_text(json.dumps(raw))
    summary = convert("pacs", tmp_path / "PACS", shards, workers=1, progress=False, shard_samples=3)
    assert summary.reused_shards == summary.num_shards and (shards / "_info.json").read_bytes() == before


def _downgrade(root: Path) -> None:
    raw = json.loads((root / "_info.json").read_text())
    raw["format_version"] = 1
    for domain in raw["splits"].values():
        for split in domain.values():
            for shard in split["shards"]:
                del shard["sample_offsets"]
    write_manifest(root, raw)


def test_index_upgrades_a_version_1_manifest_in_place(shards, capsys):
    current = (shards / "_info.json").read_bytes()
    _downgrade(shards)
    assert load_manifest(shards).shards("photo", "train")[0].sample_offsets is None
    assert main(["index", str(shards), "--no-progress"]) == 0
    assert "added sample offsets of" in capsys.readouterr().out
    assert (shards / "_info.json").read_bytes() == current
    stamp = (shards / "_info.json").stat().st_mtime_ns
    assert main(["index", str(shards), "--no-progress"]) == 0  # version 2: nothing to do
    assert "already format_version 2" in capsys.readouterr().out
    assert (shards / "_info.json").stat().st_mtime_ns == stamp and index_manifest(shards, progress=False) is None


def test_index_refuses_a_shard_that_does_not_match(shards, capsys):
    _downgrade(shards)
    path, shard = _all_shards(shards)[0]
    path.write_bytes(path.read_bytes() + bytes(10240))  # one more zero record: readable, size differs
    with pytest.raises(ManifestError, match=f"{shard.file}: .* bytes on disk"):
        index_manifest(shards, progress=False)
    assert load_manifest(shards).format_version == 1  # untouched
    assert main(["index", str(shards / "_info.json"), "--no-progress"]) == 1
    assert "is a file, not a shard folder" in capsys.readouterr().err
