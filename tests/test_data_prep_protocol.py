"""The evaluation protocol survives conversion: official splits are found in every published
layout or the conversion stops saying where it looked; a random holdout happens only when asked
for; ImageNet class indices never shift; a (domain, class) without val is reported.

Each test plants one defect in a miniature of the published layout.
"""
from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from data_prep.__main__ import main
from data_prep.convert import convert
from data_prep.manifest import load_manifest
from data_prep.records import ConvertError, LayoutNotFound
from support.data_prep_samples import image_bytes, make_class_tree, make_domainnet, make_pacs, read_all_samples, write


def _convert(fmt: str, src: Path, out: Path, **options):
    return convert(fmt, src, out, workers=1, progress=False, **options)


def _cli(*argv: str) -> int:
    return main(["convert", *argv, "--workers", "1", "--no-progress"])


def _problems(out: Path, kind: str) -> dict[str, dict]:
    return {p["file"]: p for p in json.loads((out / "_report.json").read_text())["problems"] if p["kind"] == kind}


def _splits(out: Path) -> dict[str, str]:
    """{image name below the domain folder: split}, whatever folder the images were read from."""
    return {"/".join(src.split("/")[-3:]): s["split"] for src, s in read_all_samples(out).items()}


# --- PACS: pacs_data.zip, the kfold link, --src at the image folder -----------------------------


@pytest.mark.parametrize("images, labels", [("pacs_data/pacs_data", "pacs_label"),  # the zips as they extract
                                            ("images", "splits"),  # Dassl
                                            (".", "pacs_label")])
def test_published_pacs_layouts_convert_with_the_official_split(tmp_path, images, labels):
    make_pacs(tmp_path / "kfold_layout")
    files = make_pacs(tmp_path / "PACS", images=images, labels=labels)
    _convert("pacs", tmp_path / "kfold_layout", tmp_path / "reference")
    _convert("pacs", tmp_path / "PACS", tmp_path / "out", strict=True)
    assert sorted(read_all_samples(tmp_path / "out")) == sorted(files)
    assert _splits(tmp_path / "out") == _splits(tmp_path / "reference")  # crossval -> val, test extras -> test
    assert set(_splits(tmp_path / "out").values()) == {"train", "val", "test"}
    assert load_manifest(tmp_path / "out").converter["args"]["val_fraction"] is None


def test_a_kfold_link_to_pacs_data_is_one_folder_not_a_duplicate(tmp_path, capsys):
    make_pacs(tmp_path / "PACS", images="pacs_data/pacs_data", labels="pacs_label")
    (tmp_path / "PACS/kfold").symlink_to("pacs_data/pacs_data")  # the common workaround
    assert _cli("--format", "pacs", "--src", str(tmp_path / "PACS"), "--out", str(tmp_path / "out"), "--strict") == 0
    assert "warnings 0" in capsys.readouterr().out
    assert _problems(tmp_path / "out", "duplicate_dir") == {}
    assert len(read_all_samples(tmp_path / "out")) == 16


@pytest.mark.parametrize("layout, image_folder", [("kfold", "kfold"), ("zip", "pacs_data/pacs_data")])
def test_src_at_the_image_folder_stops_instead_of_a_random_holdout(tmp_path, capsys, layout, image_folder):
    labels = "pacs_label" if layout == "zip" else "."
    make_pacs(tmp_path / "PACS", images=image_folder, labels=labels)
    src = tmp_path / "PACS" / image_folder
    assert _cli("--format", "pacs", "--src", str(src), "--out", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"no PACS split files {{domain}}_{{train,crossval,test}}_kfold.txt anywhere under {src}" in err
    assert f"use --src {tmp_path / 'PACS'}" in err and "--val-fraction F" in err
    assert not (tmp_path / "out").exists()
    # Asked for on purpose, the holdout is made, and the manifest says so.
    assert _cli("--format", "pacs", "--src", str(src), "--out", str(tmp_path / "out"), "--val-fraction", "0.5") == 0
    assert "a seeded random holdout of 0.5" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "out")
    assert manifest.converter["args"]["val_fraction"] == 0.5 and manifest.num_samples("photo", "val") == 4


def test_a_holdout_asked_for_where_official_splits_exist_is_refused(tmp_path):
    make_pacs(tmp_path / "PACS")
    with pytest.raises(ConvertError, match=r"--val-fraction 0.2 asks for a random holdout, but PACS split files"):
        _convert("pacs", tmp_path / "PACS", tmp_path / "out", val_fraction=0.2)
    make_class_tree(tmp_path / "inet", ["train", "val"], ["n01440764"], 1, ext="JPEG")
    with pytest.raises(ConvertError, match="has its own split for every domain"):
        _convert("imagenet", tmp_path / "inet", tmp_path / "out", val_fraction=0.2)


def test_split_files_whose_domains_no_image_folder_holds_name_the_folders_searched(tmp_path):
    make_pacs(tmp_path / "PACS", images="elsewhere", labels="pacs_label")
    with pytest.raises(LayoutNotFound) as caught:
        _convert("pacs", tmp_path / "PACS", tmp_path / "out")
    message = str(caught.value)
    assert "no image folder holds them" in message and str(tmp_path / "PACS/pacs_data/pacs_data") in message
    assert "--format pacs reads" in message and "\n" not in message


@pytest.mark.parametrize("fmt", ["pacs", "vlcs", "office_home", "domainnet", "imagefolder", "imagenet",
                                 "imagenet_sketch"])
def test_layout_not_found_names_the_folder_and_the_layouts_accepted(tmp_path, capsys, fmt):
    src = tmp_path / "wrong"
    write(src / "notes" / "readme.txt", b"not a dataset\n")
    options = ["--val-fraction", "0.1"] if fmt == "pacs" else []
    assert _cli("--format", fmt, "--src", str(src), "--out", str(tmp_path / "out"), *options) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(src) in err and f"--format {fmt} reads" in err, err


def test_domainnet_without_lists_names_the_folder(tmp_path):
    make_domainnet(tmp_path / "DomainNet")
    for listing in (tmp_path / "DomainNet").glob("*.txt"):
        listing.unlink()
    with pytest.raises(LayoutNotFound, match=rf"no DomainNet list files .* in {tmp_path / 'DomainNet'}; --format "
                                             "domainnet reads"):
        _convert("domainnet", tmp_path / "DomainNet", tmp_path / "out")


# --- ImageNet and ImageNet-Sketch: indices never shift -----------------------------------------

SYNSETS = ["n01440764", "n01443537", "n01484850", "n01491361"]


def _label_of(out: Path) -> dict[str, str]:
    """{src: synset of the sample's class index}."""
    classes = load_manifest(out).classes
    return {src: classes[int(s["cls"])] for src, s in read_all_samples(out).items()}


def test_standalone_sketch_with_a_missing_synset_folder_stops(tmp_path, capsys):
    make_class_tree(tmp_path / "sk", ["sketch"], SYNSETS[:1] + SYNSETS[2:], 1, ext="JPEG")  # n01443537 missing
    assert _cli("--format", "imagenet_sketch", "--src", str(tmp_path / "sk"), "--out", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "holds 3 synset folders" in err and "--classes-from" in err, err
    # The fix: ImageNet's class order; the missing synset keeps its index and is named.
    make_class_tree(tmp_path / "inet", ["train"], SYNSETS, 1, ext="JPEG")
    _convert("imagenet", tmp_path / "inet", tmp_path / "inet_out")
    _convert("imagenet_sketch", tmp_path / "sk", tmp_path / "out", classes_from=tmp_path / "inet_out")
    assert all(src.split("/")[1] == synset for src, synset in _label_of(tmp_path / "out").items())
    assert load_manifest(tmp_path / "out").classes == load_manifest(tmp_path / "inet_out").classes
    assert "n01443537" in _problems(tmp_path / "out", "class_missing")["imagenet_sketch"]["detail"]


def test_standalone_sketch_with_all_1000_folders_keeps_sorted_indices(tmp_path):
    synsets = [f"n{10000000 + 7 * i:08d}" for i in range(1000)]
    for synset in synsets:
        (tmp_path / "sk" / "sketch" / synset).mkdir(parents=True)  # empty: a class without images
    for i in (0, 500, 999):
        write(tmp_path / "sk" / "sketch" / synsets[i] / "a.JPEG", image_bytes(seed=i))
    _convert("imagenet_sketch", tmp_path / "sk", tmp_path / "out")
    manifest = load_manifest(tmp_path / "out")
    assert manifest.classes == tuple(synsets)
    labels = {src.split("/")[1]: int(s["cls"]) for src, s in read_all_samples(tmp_path / "out").items()}
    assert labels == {synsets[0]: 0, synsets[500]: 500, synsets[999]: 999}


def test_sketch_beside_imagenet_keeps_imagenet_indices(tmp_path):
    src = tmp_path / "inet"
    make_class_tree(src, ["train", "val"], SYNSETS, 1, ext="JPEG")
    make_class_tree(src, ["sketch"], SYNSETS[2:], 1, ext="JPEG", name="s{i}")  # the first two missing
    (src / "train" / "n09999999").mkdir()  # an empty synset folder keeps its place too
    _convert("imagenet", src, tmp_path / "out")
    assert load_manifest(tmp_path / "out").classes == tuple(SYNSETS + ["n09999999"])
    assert all(src_path.split("/")[1] == synset for src_path, synset in _label_of(tmp_path / "out").items())
    write(src / "sketch" / "n00000001" / "x.JPEG", image_bytes())  # not an ImageNet class here
    with pytest.raises(ConvertError, match=r"synsets \['n00000001'\] .* are not ImageNet classes"):
        _convert("imagenet", src, tmp_path / "out2")


def test_unextracted_synset_archives_stop_with_the_command_that_extracts_them(tmp_path, capsys):
    src = tmp_path / "inet"
    make_class_tree(src, ["val"], SYNSETS[:2], 1, ext="JPEG")
    (src / "train").mkdir()
    for i, synset in enumerate(SYNSETS[:2]):
        image = write(tmp_path / "staging" / f"{synset}_{i}.JPEG", image_bytes(seed=i))
        with tarfile.open(src / "train" / f"{synset}.tar", "w") as archive:
            archive.add(image, arcname=image.name)
    assert _cli("--format", "imagenet", "--src", str(src), "--out", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2 unextracted per-synset archives (n01440764.tar" in err, err
    command = err.split("extract each into its own folder first: ", 1)[1]
    subprocess.run(["bash", "-c", command], check=True)  # the advice works as printed
    _convert("imagenet", src, tmp_path / "out", strict=True)
    assert load_manifest(tmp_path / "out").num_samples("imagenet", "train") == 2


def test_a_second_source_converted_into_one_root_is_refused(tmp_path):
    make_class_tree(tmp_path / "inet", ["train", "val"], SYNSETS, 1, ext="JPEG")
    make_class_tree(tmp_path / "sk", ["sketch"], SYNSETS, 1, ext="JPEG")
    _convert("imagenet", tmp_path / "inet", tmp_path / "out")
    with pytest.raises(ConvertError, match="there would replace it: .* put sketch/ beside train/ and val/"):
        _convert("imagenet_sketch", tmp_path / "sk", tmp_path / "out", classes_from=tmp_path / "out")
    assert load_manifest(tmp_path / "out").domains == ("imagenet",)


# --- empty validation ----------------------------------------------------------------------------


def test_holdout_leaving_a_class_without_val_is_reported_per_domain_and_class(tmp_path, capsys):
    src = tmp_path / "src"
    make_class_tree(src, ["art", "photo"], ["dog"], 10)
    make_class_tree(src, ["art", "photo"], ["horse"], 2)  # 0.1 of 2 rounds to 0
    assert _cli("--format", "imagefolder", "--src", str(src), "--out", str(tmp_path / "out")) == 0
    out = capsys.readouterr().out
    gaps = _problems(tmp_path / "out", "no_val")
    assert set(gaps) == {"art/horse", "photo/horse"}
    assert load_manifest(tmp_path / "out").no_val == (("art", "horse"), ("photo", "horse"))
    assert gaps["photo/horse"]["action"] == "warning"
    assert "class 'horse' of domain 'photo' has 2 train and 0 val samples" in gaps["photo/horse"]["detail"]
    assert out.count("warning: no_val: ") == 2 and "warnings 2" in out
    assert _cli("--format", "imagefolder", "--src", str(src), "--out", str(tmp_path / "out"), "--strict") == 1


def test_split_file_without_a_class_in_crossval_is_reported(tmp_path):
    make_pacs(tmp_path / "PACS")
    crossval = tmp_path / "PACS/photo_crossval_kfold.txt"
    crossval.write_text("".join(line + "\n" for line in crossval.read_text().splitlines() if "/horse/" not in line))
    _convert("pacs", tmp_path / "PACS", tmp_path / "out")
    assert set(_problems(tmp_path / "out", "no_val")) == {"photo/horse"}


def test_a_val_image_skipped_while_writing_is_a_late_no_val(tmp_path):
    make_pacs(tmp_path / "PACS")  # img0 of each class is its only crossval image
    write(tmp_path / "PACS/kfold/art_painting/dog/img0.jpg", image_bytes("jpeg_truncated"))
    summary = _convert("pacs", tmp_path / "PACS", tmp_path / "out")
    assert set(_problems(tmp_path / "out", "no_val")) == {"art_painting/dog"}
    assert load_manifest(tmp_path / "out").no_val == (("art_painting", "dog"),)
    assert summary.no_val == (_problems(tmp_path / "out", "no_val")["art_painting/dog"]["detail"],)
