"""Bad input: each kind is skipped and reported (console count, _report.json), or is a clear error
naming the file; --strict turns every skip into an error; no manifest lists anything half-done.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.__main__ import main
from data_prep.convert import convert
from data_prep.images import decode_rgb
from data_prep.manifest import MANIFEST_NAME, load_manifest
from data_prep.records import ConvertError
from support.data_prep_samples import image_bytes, image_of, make_class_tree, make_pacs, read_all_samples, write


def _convert(fmt: str, src: Path, out: Path, **options):
    return convert(fmt, src, out, workers=1, progress=False, **options)


def _problems(out: Path) -> dict[str, dict]:
    return {p["file"]: p for p in json.loads((out / "_report.json").read_text())["problems"]}


@pytest.fixture
def tree(tmp_path) -> Path:
    src = tmp_path / "src"
    make_class_tree(src, ["art", "photo"], ["dog", "horse"], 2)
    return src


SKIPPED_CONTENT = {
    "jpeg_truncated": "corrupt_image",
    "png_truncated": "corrupt_image",
    "empty": "empty_file",
    "text": "not_an_image",
    "png_16bit": "unsupported_mode",
    "tiff_cmyk": "unsupported_mode",
    "gif_animated": "unsupported_mode",
}


@pytest.mark.parametrize("kind", sorted(SKIPPED_CONTENT))
def test_bad_image_content_is_skipped_and_reported(tree, tmp_path, kind, capsys):
    write(tree / "photo/dog/bad.jpg", image_bytes(kind))
    assert main(["convert", "--format", "imagefolder", "--src", str(tree), "--out", str(tmp_path / "out"),
                 "--workers", "1", "--no-progress"]) == 0
    assert "skipped 1," in capsys.readouterr().out
    problem = _problems(tmp_path / "out")["photo/dog/bad.jpg"]
    assert (problem["kind"], problem["action"]) == (SKIPPED_CONTENT[kind], "skipped")
    manifest = load_manifest(tmp_path / "out")
    assert manifest.skipped == 1 and manifest.num_samples("photo") == 4
    assert "photo/dog/bad.jpg" not in read_all_samples(tmp_path / "out")


@pytest.mark.parametrize("kind", ["jpeg_cmyk", "jpeg_gray", "png_rgba", "png_palette", "webp"])
def test_images_decode_image_handles_are_copied_unchanged(tree, tmp_path, kind):
    data = image_bytes(kind)
    write(tree / "photo/dog/special.img", data)
    _convert("imagefolder", tree, tmp_path / "out", val_fraction=0.5)  # 0.1 of 2 leaves no val: no_val
    assert image_of(read_all_samples(tmp_path / "out")["photo/dog/special.img"]) == data
    assert _problems(tmp_path / "out") == {}


@pytest.mark.parametrize("kind", ["bmp", "tiff", "gif"])
def test_other_formats_are_reencoded_losslessly_as_png(tree, tmp_path, kind):
    data = image_bytes(kind)
    write(tree / "photo/dog/legacy.bmp", data)
    _convert("imagefolder", tree, tmp_path / "out")
    sample = read_all_samples(tmp_path / "out")["photo/dog/legacy.bmp"]
    decoded = decode_rgb(sample["png"]).permute(1, 2, 0).numpy()
    with Image.open(tree / "photo/dog/legacy.bmp") as original:
        assert np.array_equal(decoded, np.asarray(original.convert("RGB")))
    assert _problems(tmp_path / "out")["photo/dog/legacy.bmp"]["action"] == "reencoded"


def test_unreadable_file_is_skipped(tree, tmp_path):
    (tree / "photo/dog/dangling.jpg").symlink_to(tree / "nowhere.jpg")
    _convert("imagefolder", tree, tmp_path / "out")
    assert _problems(tmp_path / "out")["photo/dog/dangling.jpg"]["kind"] == "unreadable"


def test_split_file_naming_a_missing_image_is_skipped(tmp_path):
    make_pacs(tmp_path / "PACS")
    (tmp_path / "PACS/kfold/photo/dog/img1.jpg").unlink()
    _convert("pacs", tmp_path / "PACS", tmp_path / "out")
    problem = _problems(tmp_path / "out")["kfold/photo/dog/img1.jpg"]
    assert problem["kind"] == "missing_file" and "photo_train_kfold.txt:1 " in problem["detail"]
    assert load_manifest(tmp_path / "out").num_samples("photo", "train") == 3


def test_duplicate_line_is_skipped_and_images_in_two_splits_are_an_error(tmp_path):
    make_pacs(tmp_path / "PACS")
    train = tmp_path / "PACS/photo_train_kfold.txt"
    train.write_text(train.read_text() + "photo/dog/img1.jpg 1\n")
    _convert("pacs", tmp_path / "PACS", tmp_path / "out")
    assert _problems(tmp_path / "out")["photo/dog/img1.jpg"]["kind"] == "duplicate_entry"
    train.write_text(train.read_text() + "photo/dog/img0.jpg 1\n")  # img0 is in crossval too
    with pytest.raises(ConvertError, match=r"photo/dog/img0.jpg is listed in .*photo_train_kfold.txt:\d+ and in "
                                           r".*photo_crossval_kfold.txt"):
        _convert("pacs", tmp_path / "PACS", tmp_path / "out2")


def test_label_that_contradicts_the_class_folder_is_an_error(tmp_path):
    make_pacs(tmp_path / "PACS")
    crossval = tmp_path / "PACS/photo_crossval_kfold.txt"
    crossval.write_text(crossval.read_text().replace("photo/dog/img0.jpg 1", "photo/dog/img0.jpg 2"))
    with pytest.raises(ConvertError, match="photo_crossval_kfold.txt:1: label 1 is class 'dog'"):
        _convert("pacs", tmp_path / "PACS", tmp_path / "out")


def test_malformed_split_line_is_an_error_naming_the_line(tmp_path):
    make_pacs(tmp_path / "PACS")
    (tmp_path / "PACS/art_painting_train_kfold.txt").write_text("art_painting/dog/img1.jpg one\n")
    with pytest.raises(ConvertError, match="art_painting_train_kfold.txt:1: expected 'relative/path label'"):
        _convert("pacs", tmp_path / "PACS", tmp_path / "out")


def test_test_list_extras_and_mismatches_are_reported(tmp_path):
    make_pacs(tmp_path / "PACS", test_extra=1)
    test = tmp_path / "PACS/photo_test_kfold.txt"
    test.write_text("".join(line + "\n" for line in test.read_text().splitlines() if "img1" not in line))
    _convert("pacs", tmp_path / "PACS", tmp_path / "out")
    problem = _problems(tmp_path / "out")[str(test)]
    assert problem["kind"] == "split_mismatch" and "2 train/crossval images" in problem["detail"]
    assert load_manifest(tmp_path / "out").num_samples("photo", "test") == 2


def test_class_missing_from_a_domain_is_reported(tree, tmp_path):
    make_class_tree(tree, ["art"], ["cat"], 1)
    _convert("imagefolder", tree, tmp_path / "out")
    problem = _problems(tmp_path / "out")["photo"]
    assert problem["kind"] == "class_missing" and "'cat'" in problem["detail"]
    assert load_manifest(tmp_path / "out").classes == ("cat", "dog", "horse")


def test_empty_domain_is_left_out_and_reported(tree, tmp_path):
    (tree / "sketch/dog").mkdir(parents=True)
    _convert("imagefolder", tree, tmp_path / "out")
    assert _problems(tmp_path / "out")["sketch"]["kind"] == "empty_domain"
    assert load_manifest(tmp_path / "out").domains == ("art", "photo")


def test_no_images_at_all_is_an_error(tmp_path):
    (tmp_path / "src/photo/dog").mkdir(parents=True)
    with pytest.raises(ConvertError, match="no images found"):
        _convert("imagefolder", tmp_path / "src", tmp_path / "out")


def test_colliding_keys_are_disambiguated_and_reported(tree, tmp_path):
    write(tree / "photo/dog/a b.jpg", image_bytes(seed=1))
    write(tree / "photo/dog/a_b.jpg", image_bytes(seed=2))
    write(tree / "photo/dog/a_b.png", image_bytes("png", seed=3))
    _convert("imagefolder", tree, tmp_path / "out")
    samples = read_all_samples(tmp_path / "out")
    keys = {samples[name]["__key__"] for name in ("photo/dog/a b.jpg", "photo/dog/a_b.jpg", "photo/dog/a_b.png")}
    assert len(keys) == 3 and all(k.startswith("photo-dog-a_b-") for k in keys)
    assert _problems(tmp_path / "out")["photo/dog/a_b.png"]["action"] == "renamed"


def test_strict_turns_a_scan_skip_into_an_error_before_writing(tmp_path):
    make_pacs(tmp_path / "PACS")
    (tmp_path / "PACS/kfold/photo/dog/img1.jpg").unlink()
    with pytest.raises(ConvertError, match="--strict: 1 input problems:\n  missing_file: kfold/photo/dog/img1.jpg"):
        _convert("pacs", tmp_path / "PACS", tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()


def test_strict_turns_a_content_skip_into_an_error_without_manifest(tree, tmp_path, capsys):
    out = tmp_path / "out"
    _convert("imagefolder", tree, out)  # a valid earlier output must not survive as a stale manifest
    write(tree / "art/horse/zero.jpg", b"")
    assert main(["convert", "--format", "imagefolder", "--src", str(tree), "--out", str(out), "--strict",
                 "--val-fraction", "0.5", "--workers", "1", "--no-progress"]) == 1
    assert "empty_file: art/horse/zero.jpg" in capsys.readouterr().err
    assert not (out / MANIFEST_NAME).exists()
    assert _problems(out)["art/horse/zero.jpg"]["kind"] == "empty_file"


def test_out_inside_src_or_unrelated_nonempty_out_is_refused(tree, tmp_path):
    with pytest.raises(ConvertError, match="inside --src"):
        _convert("imagefolder", tree, tree / "shards")
    write(tmp_path / "busy/notes.txt", b"mine")
    with pytest.raises(ConvertError, match="not empty and holds no data_prep output"):
        _convert("imagefolder", tree, tmp_path / "busy")


def test_files_no_list_names_and_stray_files_are_reported(tmp_path):
    make_pacs(tmp_path / "PACS")
    write(tmp_path / "PACS/kfold/photo/dog/extra.jpg", image_bytes(seed=5))
    write(tmp_path / "PACS/kfold/cartoon/dog/c.jpg", image_bytes(seed=6))  # a domain without split files
    _convert("pacs", tmp_path / "PACS", tmp_path / "out")
    problems = _problems(tmp_path / "out")
    assert problems["kfold/photo"]["kind"] == "unlisted_files" and "extra.jpg" in problems["kfold/photo"]["detail"]
    assert problems["kfold/cartoon"]["kind"] == "unlisted_files"
    assert load_manifest(tmp_path / "out").domains == ("art_painting", "photo")
    make_class_tree(tmp_path / "tree", ["photo"], ["dog"], 1)
    write(tmp_path / "tree/photo/loose.jpg", image_bytes())
    _convert("imagefolder", tmp_path / "tree", tmp_path / "out2")
    assert _problems(tmp_path / "out2")["photo/loose.jpg"]["kind"] == "outside_class_folder"


def test_bad_options_are_errors(tree, tmp_path):
    with pytest.raises(ConvertError, match="--val-fraction must be in"):
        _convert("imagefolder", tree, tmp_path / "out", val_fraction=1.0)
    with pytest.raises(ConvertError, match="unknown format"):
        _convert("pacs2", tree, tmp_path / "out")


def test_file_name_that_is_not_utf8_is_skipped(tree, tmp_path):
    import os

    os.makedirs(tree / "photo/dog", exist_ok=True)
    with open(os.path.join(os.fsencode(tree / "photo/dog"), b"caf\xe9.jpg"), "wb") as handle:
        handle.write(image_bytes())
    _convert("imagefolder", tree, tmp_path / "out")
    problem = next(p for p in _problems(tmp_path / "out").values() if p["kind"] == "bad_file_name")
    assert "caf" in problem["file"] and load_manifest(tmp_path / "out").num_samples("photo") == 4


def _reported(out: Path, kind: str) -> dict[str, dict]:
    return {p["file"]: p for p in json.loads((out / "_report.json").read_text())["problems"] if p["kind"] == kind}


@pytest.mark.timeout(120)  # before the fix, loops were walked until the kernel's symlink limit
def test_symlink_loop_does_not_multiply_samples(tmp_path, capsys):
    """The fault-injection case: `ln -s .. SRC/dA/cat/loop` turned 24 images into 504 samples."""
    src = tmp_path / "src"
    written = make_class_tree(src, ["dA", "dB"], ["cat", "dog"], 6)
    (src / "dA/cat/loop").symlink_to("..")
    assert main(["convert", "--format", "imagefolder", "--src", str(src), "--out", str(tmp_path / "out"),
                 "--workers", "1", "--no-progress"]) == 0
    samples = read_all_samples(tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert sorted(samples) == sorted(written) and sum(manifest.num_samples(d) for d in manifest.domains) == 24
    for name, sample in samples.items():  # every label is its real class folder's
        assert manifest.classes[int(sample["cls"])] == name.split("/")[1]
    assert manifest.classes == ("cat", "dog")
    loops = _reported(tmp_path / "out", "symlink_loop")
    assert set(loops) == {"dA/cat/loop"} and loops["dA/cat/loop"]["action"] == "skipped"


@pytest.mark.timeout(120)  # before the fix, this walk branched at every level: no end in sight
def test_symlink_loop_among_class_folders_is_not_a_class(tmp_path):
    src = tmp_path / "src"
    written = make_class_tree(src, ["dA", "dB"], ["cat", "dog"], 2)
    (src / "dA/self").symlink_to(".")  # where the domain lists its class folders
    _convert("imagefolder", src, tmp_path / "out")
    assert load_manifest(tmp_path / "out").classes == ("cat", "dog")
    assert sorted(read_all_samples(tmp_path / "out")) == sorted(written)
    assert list(_reported(tmp_path / "out", "symlink_loop")) == ["dA/self"]


def test_one_real_file_gives_one_sample(tmp_path):
    src = tmp_path / "src"
    written = make_class_tree(src, ["dA", "dB"], ["cat", "dog"], 3)
    (src / "dB/cat/alias").symlink_to("../../dA/cat")  # the same real folder under another domain
    (src / "dA/dog/copy.jpg").symlink_to("img0.jpg")  # the same real file twice in one folder
    write(src / "dA/cat/sub/deep.jpg", image_bytes(seed=77))
    (src / "dA/cat/again").symlink_to("sub")  # a second way into a folder the walk lists anyway
    elsewhere = make_class_tree(tmp_path / "elsewhere", ["x"], ["more"], 2)
    (src / "dB/dog/more").symlink_to(tmp_path / "elsewhere/x/more")  # a linked folder is followed once
    out = tmp_path / "out"
    _convert("imagefolder", src, out)
    samples = read_all_samples(out)
    expected = set(written) | {"dA/cat/sub/deep.jpg"} | {f"dB/dog/more/{n.split('/')[-1]}" for n in elsewhere}
    assert set(samples) == expected
    duplicates = _reported(out, "duplicate_file")
    assert set(duplicates) == ({"dA/dog/copy.jpg", "dB/cat/alias/sub/deep.jpg"}
                               | {f"dB/cat/alias/img{i}.jpg" for i in range(3)})
    assert "same file as dA/dog/img0.jpg" in duplicates["dA/dog/copy.jpg"]["detail"]
    assert set(_reported(out, "duplicate_dir")) == {"dA/cat/again", "dB/cat/alias/again"}


@pytest.mark.timeout(120)
def test_symlink_loop_in_a_pacs_tree_is_reported_once(tmp_path):
    make_pacs(tmp_path / "PACS")
    (tmp_path / "PACS/kfold/photo/dog/loop").symlink_to("../..")
    reference = tmp_path / "ref"
    _convert("pacs", tmp_path / "PACS", tmp_path / "out")
    samples = read_all_samples(tmp_path / "out")
    assert len(samples) == 16 and not any("loop" in name for name in samples)
    assert list(_reported(tmp_path / "out", "symlink_loop")) == ["kfold/photo/dog/loop"]
    with pytest.raises(ConvertError, match="symlink_loop: kfold/photo/dog/loop"):
        _convert("pacs", tmp_path / "PACS", reference, strict=True)


def test_pixel_bomb_is_skipped_from_its_header(tree, tmp_path, capsys):
    from support.data_prep_samples import png_header_only

    write(tree / "photo/dog/bomb.png", png_header_only(30000, 30000))
    out = tmp_path / "out"
    assert main(["convert", "--format", "imagefolder", "--src", str(tree), "--out", str(out),
                 "--workers", "1", "--no-progress"]) == 0
    problem = _problems(out)["photo/dog/bomb.png"]
    assert problem == {"kind": "too_many_pixels", "action": "skipped", "file": "photo/dog/bomb.png",
                       "detail": "too_many_pixels: 30000x30000 > 89478485"}
    assert load_manifest(out).converter["args"]["max_pixels"] == 89478485
    assert main(["convert", "--format", "imagefolder", "--src", str(tree), "--out", str(out), "--strict",
                 "--val-fraction", "0.5", "--workers", "1", "--no-progress"]) == 1
    assert "too_many_pixels: photo/dog/bomb.png: too_many_pixels: 30000x30000 > 89478485" in capsys.readouterr().err


def test_max_pixels_option(tree, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", "--format", "imagefolder", "--src", str(tree), "--out", str(out), "--max-pixels", "255",
                 "--workers", "1", "--no-progress"]) == 0  # every image is 16x16 = 256 px: all skipped
    assert load_manifest(out).skipped == 8 and _problems(out)["photo/dog/img0.jpg"]["kind"] == "too_many_pixels"
    assert main(["convert", "--format", "imagefolder", "--src", str(tree), "--out", str(out), "--max-pixels", "256",
                 "--workers", "1", "--no-progress"]) == 0
    assert load_manifest(out).num_samples("photo") == 4


def test_out_or_synth_out_naming_a_file_is_a_one_line_error(tree, tmp_path, capsys):
    target = write(tmp_path / "a_file", b"x")
    for argv in (["convert", "--format", "imagefolder", "--src", str(tree), "--out", str(target), "--no-progress"],
                 ["convert", "--format", "imagefolder", "--src", str(tree), "--out", str(target / "sub"),
                  "--no-progress"],
                 ["synth", "--out", str(target)]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and str(target) in err
    with pytest.raises(ConvertError, match="exists and is not a directory"):
        _convert("imagefolder", tree, target)
