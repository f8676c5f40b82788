"""verify catches a flipped byte, a truncated shard, a missing shard and bad samples; the manifest
reader names the file and key at fault."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep.convert import convert
from data_prep.manifest import ManifestError, load_manifest, write_manifest
from data_prep.shard_writer import file_sha256
from data_prep.tarshard import sample_members, write_tar
from data_prep.verify import verify
from support.data_prep_samples import image_bytes, make_pacs, png_header_only


@pytest.fixture
def shards(tmp_path) -> Path:
    make_pacs(tmp_path / "PACS")
    out = tmp_path / "out"
    convert("pacs", tmp_path / "PACS", out, workers=1, progress=False, shard_samples=2)
    return out


def _first_shard(root: Path) -> tuple[Path, str]:
    manifest = load_manifest(root)
    shard = manifest.shards("photo", "train")[0]
    return manifest.root / shard.file, shard.file


def test_clean_output_verifies_with_decode(shards, capsys):
    assert verify(shards, decode=True, progress=False) == []
    assert main(["verify", str(shards), "--decode", "--no-progress", "--workers", "2"]) == 0
    assert capsys.readouterr().out.strip().endswith(": OK")


def test_flipped_byte_is_reported_as_tampered(shards, capsys):
    path, name = _first_shard(shards)
    data = bytearray(path.read_bytes())
    data[600] ^= 0x01  # inside the first image
    path.write_bytes(bytes(data))
    faults = verify(shards, progress=False)
    assert faults == [f"{name}: sha256 mismatch (tampered or corrupted): {file_sha256(path)} != manifest "
                      f"{load_manifest(shards).shards('photo', 'train')[0].sha256}"]
    assert main(["verify", str(shards), "--no-progress"]) == 1
    assert "FAILED with 1 faults" in capsys.readouterr().out


def test_truncated_shard_is_reported(shards):
    path, name = _first_shard(shards)
    path.write_bytes(path.read_bytes()[:1500])
    faults = verify(shards, progress=False)
    assert faults[0].startswith(f"{name}: truncated: 1500 bytes on disk, manifest lists ")
    assert any("sha256 mismatch" in f for f in faults)
    assert any(f.startswith(f"{name}: unreadable tar after") or "samples read, manifest lists 2" in f for f in faults)


def test_missing_shard_is_reported(shards):
    path, name = _first_shard(shards)
    path.unlink()
    assert verify(shards, progress=False) == [f"{name}: missing shard (listed in the manifest, not on disk)"]


def _rewrite_shard(root: Path, members: list[tuple[str, bytes]]) -> str:
    """Replace the first photo/train shard and update its manifest entry, so only content checks can fail."""
    path, name = _first_shard(root)
    offsets = write_tar(path, members)
    raw = json.loads((root / "_info.json").read_text())
    entry = raw["splits"]["photo"]["train"]["shards"][0]
    entry.update(num_bytes=path.stat().st_size, sha256=file_sha256(path),
                 sample_offsets=offsets[:entry["num_samples"]] + offsets[-1:])
    write_manifest(root, raw)
    return name


def test_bad_samples_are_reported_precisely(shards):
    photo = load_manifest(shards).domain_index("photo")
    good = sample_members("k1", "jpg", image_bytes(), label=1, domain_index=photo, src="a.jpg")
    bad_label = sample_members("k2", "jpg", image_bytes(), label=7, domain_index=photo, src="b.jpg")
    wrong_domain = sample_members("k1", "jpg", image_bytes(), label=0, domain_index=photo + 1, src="c.jpg")
    name = _rewrite_shard(shards, good + bad_label[:-1] + wrong_domain)
    faults = verify(shards, progress=False)
    assert f"{name}: sample k2: missing fields ['src']" in faults
    assert f"{name}: sample k1: dom b'{photo + 1}' but the shard belongs to domain {photo}" in faults
    assert f"{name}: duplicate key k1 (also in {name})" in faults
    assert f"{name}: 3 samples read, manifest lists 2" in faults


def test_decode_finds_an_image_that_does_not_decode(shards):
    photo = load_manifest(shards).domain_index("photo")
    members = (sample_members("k1", "jpg", image_bytes("jpeg_truncated"), label=0, domain_index=photo, src="a")
               + sample_members("k2", "png", image_bytes("png_16bit"), label=0, domain_index=photo, src="b"))
    name = _rewrite_shard(shards, members)
    assert verify(shards, progress=False) == []  # without --decode the bytes are not looked at
    faults = verify(shards, decode=True, progress=False)
    assert faults[0].startswith(f"{name}: sample k1: jpg does not decode: Image is incomplete or truncated")
    assert faults[1] == f"{name}: sample k2: png decodes to torch.uint16 (16-bit); no lossless 8-bit form"


def test_decode_refuses_a_pixel_bomb_without_decoding_it(shards, monkeypatch):
    import data_prep.verify as verify_module

    photo = load_manifest(shards).domain_index("photo")
    members = (sample_members("k1", "png", png_header_only(30000, 30000), label=0, domain_index=photo, src="a")
               + sample_members("k2", "png", image_bytes("png"), label=0, domain_index=photo, src="b"))
    name = _rewrite_shard(shards, members)
    decoded = []
    real_decode = verify_module.decode_rgb
    monkeypatch.setattr(verify_module, "decode_rgb", lambda data: decoded.append(len(data)) or real_decode(data))
    faults = verify(shards, decode=True, progress=False)
    assert faults == [f"{name}: sample k1: png refused without decoding: too_many_pixels: 30000x30000 > 89478485"]
    assert len(image_bytes("png")) in decoded and len(png_header_only(30000, 30000)) not in decoded


def test_sample_offsets_are_checked_against_the_tar(shards, capsys):
    raw = json.loads((shards / "_info.json").read_text())
    entry = raw["splits"]["photo"]["train"]["shards"][0]
    entry["sample_offsets"][1] += 512  # still valid JSON-wise: increasing, within num_bytes
    write_manifest(shards, raw)
    assert verify(shards, progress=False) == [
        f"{entry['file']}: sample offsets differ from the tar from sample 1 on: manifest "
        f"{entry['sample_offsets'][1]}, tar {entry['sample_offsets'][1] - 512}"]
    assert main(["verify", str(shards), "--no-progress"]) == 1


def test_version_1_manifest_still_verifies(shards):
    raw = json.loads((shards / "_info.json").read_text())
    raw["format_version"] = 1
    for domain in raw["splits"].values():
        for split in domain.values():
            for shard in split["shards"]:
                del shard["sample_offsets"]
    write_manifest(shards, raw)
    manifest = load_manifest(shards)
    assert manifest.format_version == 1 and manifest.shards("photo", "train")[0].sample_offsets is None
    assert verify(shards, decode=True, progress=False) == []


@pytest.mark.parametrize("make", ["file", "missing"])
def test_verify_on_a_file_or_missing_path_is_a_one_line_error(tmp_path, capsys, make):
    target = tmp_path / "target"
    if make == "file":
        target.write_text("not a shard root")
    assert main(["verify", str(target), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and str(target) in err
    assert ("is a file, not a shard folder" if make == "file" else "no such folder") in err


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ManifestError, match=r"_info.json: manifest not found"):
        load_manifest(tmp_path)
    assert main(["verify", str(tmp_path), "--no-progress"]) == 1
    assert "manifest not found" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("classes"), "'classes': missing"),
    (lambda m: m.update(format_version=3), "'format_version': expected one of [1, 2], got 3"),
    (lambda m: m["splits"]["photo"]["train"]["shards"][0].pop("sample_offsets"),
     "'splits.photo.train.shards[0].sample_offsets': missing"),
    (lambda m: m["splits"]["photo"]["train"]["shards"][0].update(sample_offsets=[0, 5]),
     "'splits.photo.train.shards[0].sample_offsets': expected num_samples + 1 = 3 offsets, got 2"),
    (lambda m: m["splits"]["photo"]["train"]["shards"][0].update(sample_offsets=[1, 2, 3]),
     "'splits.photo.train.shards[0].sample_offsets': first offset must be 0, got 1"),
    (lambda m: m["splits"]["photo"]["train"]["shards"][0].update(sample_offsets=[0, 9, 9]),
     "'splits.photo.train.shards[0].sample_offsets': offsets must increase strictly: [1] = 9, [2] = 9"),
    (lambda m: m["splits"]["photo"]["train"]["shards"][0].update(sample_offsets=[0, 9, 10**9]),
     "'splits.photo.train.shards[0].sample_offsets': last offset 1000000000 is past num_bytes"),
    (lambda m: m["splits"]["photo"]["train"]["shards"][0].update(sample_offsets=[0, 9, True]),
     "'splits.photo.train.shards[0].sample_offsets': expected a list of ints"),
    (lambda m: m["splits"]["photo"]["train"]["shards"][0].update(sha256="xyz"),
     "'splits.photo.train.shards[0].sha256': expected 64 lowercase hex digits"),
    (lambda m: m["splits"]["photo"]["train"].update(num_samples=99),
     "'splits.photo.train.num_samples': 99 != sum over its shards"),
    (lambda m: m["splits"]["photo"]["val"]["shards"][0].update(file="../elsewhere.tar"),
     "'splits.photo.val.shards[0].file': '../elsewhere.tar' is not photo/val-NNNNNN.tar"),
    (lambda m: m["splits"].pop("photo"), "'splits': domains"),
    (lambda m: m["splits"]["photo"].pop("test"), "'splits.photo': expected exactly the splits"),
    (lambda m: m.update(skipped="0"), "'skipped': expected int, got str"),
])
def test_invalid_manifest_names_the_key(shards, edit, message):
    raw = json.loads((shards / "_info.json").read_text())
    edit(raw)
    (shards / "_info.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match=re.escape(f"_info.json: key {message}")):
        load_manifest(shards)


def test_manifest_api(shards):
    manifest = load_manifest(shards)
    assert manifest.num_classes == 2 and manifest.dataset == "pacs"
    assert manifest.num_samples("photo") == 8
    assert [p.name for p in manifest.shard_paths("photo", "train")] == ["train-000000.tar", "train-000001.tar"]
    assert all(p.is_absolute() and p.is_file() for p in manifest.shard_paths("photo", "train"))
    assert manifest.shard_paths("photo", "test")[0].name == "test-000000.tar"
    assert manifest.converter["format"] == "pacs" and manifest.converter["args"]["shard_samples"] == 2
    with pytest.raises(KeyError, match="unknown domain 'clipart'"):
        manifest.num_samples("clipart")
    with pytest.raises(KeyError, match="unknown split 'dev'"):
        manifest.shard_paths("photo", "dev")
