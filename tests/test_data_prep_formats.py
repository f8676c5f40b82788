"""Round trip for every source layout: tiny trees made here -> shards -> read back equal.

Checks per format: domains, classes, sample counts, labels, domain indices, splits disjoint and
covering the domain, and the image bytes in the shard equal to the source file.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from data_prep.convert import convert
from data_prep.manifest import load_manifest
from support.data_prep_samples import (
    image_bytes,
    image_of,
    make_class_tree,
    make_domainnet,
    make_pacs,
    read_all_samples,
    write,
)


def _convert(fmt: str, src: Path, out: Path, **options):
    options.setdefault("workers", 1)
    return convert(fmt, src, out, progress=False, **options)


def _check_round_trip(out: Path, source_files: dict[str, bytes], expected_label_of) -> dict[str, dict]:
    """Every source file is in exactly one sample with its bytes, label and domain."""
    manifest = load_manifest(out)
    samples = read_all_samples(out)
    assert sorted(samples) == sorted(source_files)
    for src, sample in samples.items():
        assert image_of(sample) == source_files[src]
        assert manifest.classes[int(sample["cls"])] == expected_label_of(src)
        assert int(sample["dom"]) == manifest.domain_index(sample["domain"])
        assert "." not in sample["__key__"]
    for domain in manifest.domains:
        in_domain = [s for s in samples.values() if s["domain"] == domain]
        assert manifest.num_samples(domain) == len(in_domain)
        for split in ("train", "val", "test"):
            assert manifest.num_samples(domain, split) == sum(s["split"] == split for s in in_domain)
    assert len({s["__key__"] for s in samples.values()}) == len(samples)
    return samples


def _class_folder(src: str) -> str:
    return src.split("/")[-2]


def test_pacs_with_split_files(tmp_path):
    files = make_pacs(tmp_path / "PACS", per_class=4, test_extra=1)
    _convert("pacs", tmp_path / "PACS", tmp_path / "out")
    samples = _check_round_trip(tmp_path / "out", files, _class_folder)
    manifest = load_manifest(tmp_path / "out")
    assert manifest.classes == ("dog", "horse") and manifest.domains == ("art_painting", "photo")
    # image 0 -> crossval -> val; image 3 only in test_kfold -> test; 1, 2 -> train
    expected = {"0": "val", "1": "train", "2": "train", "3": "test"}
    assert all(s["split"] == expected[src[-5]] for src, s in samples.items())
    assert manifest.num_samples("photo", "train") == 4 and manifest.num_samples("photo") == 8


def test_pacs_without_split_files_uses_seeded_holdout(tmp_path):
    files = make_class_tree(tmp_path / "src", ["cartoon", "sketch"], ["dog", "horse"], 10)
    _convert("pacs", tmp_path / "src", tmp_path / "out", val_fraction=0.2, seed=3)
    samples = _check_round_trip(tmp_path / "out", files, _class_folder)
    manifest = load_manifest(tmp_path / "out")
    assert manifest.num_samples("sketch", "val") == 4 and manifest.num_samples("sketch", "train") == 16
    assert {s["split"] for s in samples.values()} == {"train", "val"}


def test_imagefolder_keeps_names_with_dots_and_spaces(tmp_path):
    src = tmp_path / "src"
    files = make_class_tree(src, ["dom a", "dom.b"], ["cat", "dog"], 2, name="my pic.v{i}.final")
    files["dom a/cat/über ñ.jpg"] = write(src / "dom a/cat/über ñ.jpg", image_bytes(seed=7)).read_bytes()
    _convert("imagefolder", src, tmp_path / "out")
    samples = _check_round_trip(tmp_path / "out", files, _class_folder)
    assert load_manifest(tmp_path / "out").domains == ("dom_a", "dom_b")
    assert samples["dom a/cat/my pic.v0.final.jpg"]["__key__"] == "dom_a-cat-my_pic_v0_final"
    assert samples["dom a/cat/über ñ.jpg"]["__key__"] == "dom_a-cat-_ber__"


def test_vlcs_domainbed_layout(tmp_path):
    domains = ["Caltech101", "LabelMe", "SUN09", "VOC2007"]
    files = make_class_tree(tmp_path / "src" / "VLCS", domains, ["bird", "car"], 3)
    _convert("vlcs", tmp_path / "src", tmp_path / "out")
    _check_round_trip(tmp_path / "out", {f"VLCS/{k}": v for k, v in files.items()}, _class_folder)
    assert load_manifest(tmp_path / "out").domains == tuple(domains)


def test_vlcs_split_folder_layout(tmp_path):
    src = tmp_path / "src"
    files = {}
    for domain in ["CALTECH", "LABELME", "PASCAL", "SUN"]:
        for folder in ["train", "crossval", "test"]:
            made = make_class_tree(src / domain, [folder], ["0", "1"], 1)
            files.update({f"{domain}/{k}": v for k, v in made.items()})
        make_class_tree(src / domain, ["full"], ["0", "1"], 1)  # the union: must not be read
    _convert("vlcs", src, tmp_path / "out")
    samples = _check_round_trip(tmp_path / "out", files, _class_folder)
    expected = {"train": "train", "crossval": "val", "test": "test"}
    assert all(s["split"] == expected[src_path.split("/")[1]] for src_path, s in samples.items())


def test_office_home_with_space_in_domain(tmp_path):
    root = tmp_path / "src" / "OfficeHomeDataset_10072016"
    files = make_class_tree(root, ["Art", "Clipart", "Product", "Real World"], ["Alarm_Clock", "Bike"], 2)
    write(root / "ImageInfo.csv", b"metadata, not a domain\n")
    _convert("office_home", tmp_path / "src", tmp_path / "out")
    _check_round_trip(tmp_path / "out", {f"OfficeHomeDataset_10072016/{k}": v for k, v in files.items()}, _class_folder)
    manifest = load_manifest(tmp_path / "out")
    assert manifest.domains == ("Art", "Clipart", "Product", "Real_World")
    assert manifest.shard_paths("Real_World", "train")[0].parent.name == "Real_World"


def test_domainnet_lists_define_labels_and_test_split(tmp_path):
    files = make_domainnet(tmp_path / "src", per_class=3)
    _convert("domainnet", tmp_path / "src", tmp_path / "out", val_fraction=0.5)
    samples = _check_round_trip(tmp_path / "out", files, _class_folder)
    manifest = load_manifest(tmp_path / "out")
    assert manifest.classes == ("zebra", "aircraft_carrier", "The_Eiffel_Tower")  # the lists' label order
    assert all((s["split"] == "test") == src.endswith("img0.jpg") for src, s in samples.items())
    assert manifest.num_samples("real", "val") == 3 and manifest.num_samples("real", "train") == 3


def _imagenet_tree(src: Path, synsets: list[str]) -> dict[str, bytes]:
    files = make_class_tree(src, ["train"], synsets, 2, ext="JPEG")
    return files


def test_imagenet_train_val_folders_and_sketch(tmp_path):
    src = tmp_path / "src"
    synsets = ["n01440764", "n01443537", "n01484850"]
    files = make_class_tree(src, ["train", "val"], synsets, 2, ext="JPEG")
    files.update(make_class_tree(src, ["sketch"], synsets[:2], 2, ext="JPEG", name="sketch_{i}"))
    _convert("imagenet", src, tmp_path / "out")
    samples = _check_round_trip(tmp_path / "out", files, _class_folder)
    manifest = load_manifest(tmp_path / "out")
    assert manifest.classes == tuple(synsets) and manifest.domains == ("imagenet", "imagenet_sketch")
    assert all(s["split"] == {"train": "train", "val": "val", "sketch": "test"}[src_path.split("/")[0]]
               for src_path, s in samples.items())
    assert manifest.num_samples("imagenet_sketch", "test") == 4
    report = (tmp_path / "out" / "_report.json").read_text()
    assert "class_missing" in report  # n01484850 has no sketch


@pytest.mark.parametrize("labels_file", ["LOC_val_solution.csv", "val_labels.txt",
                                         "imagenet_2012_validation_synset_labels.txt"])
def test_imagenet_flat_val_with_labels_file(tmp_path, labels_file):
    src = tmp_path / "src"
    synsets = ["n01440764", "n01443537"]
    files = make_class_tree(src, ["train"], synsets, 1, ext="JPEG")
    truth = {}
    for i in range(4):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        files[f"val/{name}.JPEG"] = write(src / "val" / f"{name}.JPEG", image_bytes(seed=50 + i)).read_bytes()
        truth[name] = synsets[i % 2]
    if labels_file == "LOC_val_solution.csv":
        rows = [f"{n},{s} 1 2 30 40 {s} 5 6 7 8" for n, s in truth.items()]
        (src / labels_file).write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    elif labels_file == "val_labels.txt":
        (src / labels_file).write_text("".join(f"{n}.JPEG {s}\n" for n, s in truth.items()))
    else:
        (src / labels_file).write_text("".join(f"{s}\n" for _, s in sorted(truth.items())))
    _convert("imagenet", src, tmp_path / "out")
    label_of = {f"val/{n}.JPEG": s for n, s in truth.items()}
    samples = _check_round_trip(tmp_path / "out", files, lambda p: label_of.get(p) or _class_folder(p))
    assert sum(s["split"] == "val" for s in samples.values()) == 4


def test_imagenet_sketch_alone_can_pin_imagenet_class_order(tmp_path):
    synsets = ["n01440764", "n01443537", "n01484850"]
    make_class_tree(tmp_path / "inet", ["train"], synsets, 1, ext="JPEG")
    _convert("imagenet", tmp_path / "inet", tmp_path / "inet_out")
    files = make_class_tree(tmp_path / "sk", ["sketch"], synsets[1:], 2, ext="JPEG")
    _convert("imagenet_sketch", tmp_path / "sk", tmp_path / "sk_out", classes_from=tmp_path / "inet_out")
    _check_round_trip(tmp_path / "sk_out", files, _class_folder)
    assert load_manifest(tmp_path / "sk_out").classes == tuple(synsets)


def test_shards_are_readable_by_webdataset(tmp_path):
    import webdataset as wds

    make_pacs(tmp_path / "PACS")
    _convert("pacs", tmp_path / "PACS", tmp_path / "out", shard_samples=2)
    manifest = load_manifest(tmp_path / "out")
    urls = [str(p) for p in manifest.shard_paths("photo", "train")]
    assert len(urls) == 2
    keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False)]
    assert len(keys) == manifest.num_samples("photo", "train") == 4
    assert all(k.startswith("photo-") for k in keys)
