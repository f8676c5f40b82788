"""ImageNet (ILSVRC-2012) and ImageNet-Sketch, sharing one class order: sorted synset ids.

imagenet:
    src/train/nXXXXXXXX/*.JPEG                    -> domain "imagenet", split "train"
    src/val/nXXXXXXXX/*.JPEG                      -> split "val"   (val sorted into synset folders,
                                                                    e.g. by the common valprep.sh)
    src/val/ILSVRC2012_val_00000001.JPEG (flat)   -> split "val", labels from the first of:
        src/LOC_val_solution.csv                      Kaggle: "ImageId,PredictionString" (first synset)
        src/val_labels.txt                            "<file name> <synset>" per line
        src/imagenet_2012_validation_synset_labels.txt  one synset per line, in sorted file order
    src/sketch/nXXXXXXXX/*.JPEG (optional)        -> domain "imagenet_sketch", split "test",
                                                    so one shard root serves the train-on-ImageNet,
                                                    test-on-Sketch protocol
    The Kaggle tree src/ILSVRC/Data/CLS-LOC/{train,val} is found too. The devkit's numeric
    ILSVRC2012_validation_ground_truth.txt is not read (its ids need meta.mat): use one of the above.
imagenet_sketch:
    src/sketch/nXXXXXXXX/*.JPEG or src/nXXXXXXXX/*.JPEG  -> domain "imagenet_sketch", split "test"

Class names are the synset ids (n01440764 ...), indexed in sorted order, ImageNet's convention:
with the 1000 ILSVRC synsets, index i matches torchvision's ImageNet category names. The order is
taken from the synset FOLDERS (an empty one keeps its place). No package here ships the list of
the 1000 without a download, so a standalone ImageNet-Sketch conversion cannot tell which synset
is missing: it stops unless all 1000 folders are there, or --classes-from names an ImageNet
conversion whose class order to take. Beside ImageNet, a sketch synset that is not one of
ImageNet's classes stops the conversion. Per-synset train archives (train/n*.tar, as
ILSVRC2012_img_train.tar extracts) stop it with the command that extracts them.
"""
from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

from data_prep.records import ConvertError, Layout, LayoutNotFound, SourceRecord
from data_prep.tree import list_files_here, list_files_recursive, list_subdirs, relative_posix, stem_path

SYNSET = re.compile(r"^n\d{8}$")
SYNSET_ARCHIVE = re.compile(r"^n\d{8}\.tar$")
ILSVRC_CLASSES = 1000  # ImageNet-1k; ImageNet-Sketch has the same 1000 synsets
SKETCH_DOMAIN = "imagenet_sketch"  # not "sketch": PACS, DomainNet and the demo have a sketch domain too


def _imagenet_base(src: Path) -> Path:
    kaggle = src / "ILSVRC" / "Data" / "CLS-LOC"
    return kaggle if kaggle.is_dir() else src


def _refuse_archives(src: Path, root: Path) -> None:
    """ILSVRC2012_img_train.tar extracts to one nXXXXXXXX.tar per synset; reading them as files
    would make a train split of 0 images."""
    archives = sorted(p.name for p in list_files_here(root) if SYNSET_ARCHIVE.match(p.name))
    if archives:
        raise ConvertError(
            f"{root} holds {len(archives)} unextracted per-synset archives ({', '.join(archives[:3])}"
            f"{' ...' if len(archives) > 3 else ''}): extract each into its own folder first: "
            f"cd {root} && for f in n*.tar; do mkdir -p \"${{f%.tar}}\" && tar -xf \"$f\" -C \"${{f%.tar}}\" "
            "&& rm \"$f\"; done")


def _synset_tree(src: Path, root: Path, domain: str, split: str,
                 layout: Layout) -> tuple[list[tuple[str, SourceRecord]], set[str]]:
    """(synset, record-with-placeholder-label) for root/nXXXXXXXX/**/file, and every synset folder
    name, also of an empty folder: a class keeps its place in the order without images."""
    _refuse_archives(src, root)
    found, synsets = [], set()
    for stray in list_files_here(root):
        layout.skip("outside_class_folder", relative_posix(stray, src), "file is not inside a synset folder")
    for class_dir in list_subdirs(root):
        if not SYNSET.match(class_dir.name):
            layout.warn("unexpected_folder", relative_posix(class_dir, src), "not a synset id (nXXXXXXXX); ignored")
            continue
        synsets.add(class_dir.name)
        for path in list_files_recursive(class_dir):
            hint = f"{domain}/{class_dir.name}/{stem_path(path, class_dir)}"
            found.append((class_dir.name, SourceRecord(path, relative_posix(path, src), domain, -1, split, hint)))
    return found, synsets


def _read_val_labels(src: Path, base: Path, files: list[Path]) -> dict[str, str]:
    """File name -> synset for a flat val folder."""
    for folder in dict.fromkeys([src, base]):
        solution = folder / "LOC_val_solution.csv"
        if solution.is_file():
            with solution.open(newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
            if rows and not {"ImageId", "PredictionString"} <= set(rows[0]):
                raise ConvertError(f"{solution}: expected columns ImageId,PredictionString")
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in rows}
        pairs = folder / "val_labels.txt"
        if pairs.is_file():
            labels = {}
            for number, line in enumerate(pairs.read_text(encoding="utf-8").splitlines(), start=1):
                parts = line.split()
                if len(parts) != 2:
                    raise ConvertError(f"{pairs}:{number}: expected '<file name> <synset>', got {line!r}")
                labels[Path(parts[0]).stem] = parts[1]
            return labels
        ordered = folder / "imagenet_2012_validation_synset_labels.txt"
        if ordered.is_file():
            synsets = ordered.read_text(encoding="utf-8").split()
            if len(synsets) != len(files):
                raise ConvertError(f"{ordered}: {len(synsets)} labels for {len(files)} files in the flat val folder")
            return {path.stem: synset for path, synset in zip(files, synsets)}
    raise ConvertError(f"{base / 'val'} is flat (no synset folders) and no labels file was found: put "
                       "LOC_val_solution.csv, val_labels.txt or imagenet_2012_validation_synset_labels.txt in "
                       f"{src}")


def _flat_val(src: Path, base: Path, layout: Layout) -> list[tuple[str, SourceRecord]]:
    val_dir = base / "val"
    files = list_files_here(val_dir)
    labels = _read_val_labels(src, base, files)
    found = []
    for path in files:
        synset = labels.get(path.stem)
        if synset is None:
            layout.skip("missing_label", relative_posix(path, src), "no label for this file in the val labels file")
        elif not SYNSET.match(synset):
            raise ConvertError(f"val label {synset!r} of {path.name} is not a synset id")
        else:
            found.append((synset, SourceRecord(path, relative_posix(path, src), "imagenet", -1, "val",
                                               f"imagenet/{synset}/{path.stem}")))
    on_disk = {p.stem for p in files}
    unmatched = sorted(set(labels) - on_disk)
    if unmatched:
        layout.warn("missing_file", relative_posix(val_dir, src),
                    f"{len(unmatched)} labelled val images are not on disk, e.g. {unmatched[:5]}")
    return found


def _finish(found: list[tuple[str, SourceRecord]], domains: list[str], layout: Layout,
            classes: set[str]) -> Layout:
    """Labels = positions in the sorted synset list `classes` (ImageNet's index order)."""
    layout.classes = sorted(classes)
    index = {synset: i for i, synset in enumerate(layout.classes)}
    layout.records = sorted((replace(r, label=index[s]) for s, r in found), key=lambda r: r.src)
    layout.domains = domains
    for domain in domains:
        present = {r.label for r in layout.records if r.domain == domain}
        missing = [c for i, c in enumerate(layout.classes) if i not in present]
        if missing:
            layout.warn("class_missing", domain, f"{len(missing)} synsets have no images in {domain!r}, e.g. {missing[:5]}")
    return layout


def _sketch_root(src: Path) -> Path | None:
    if (src / "sketch").is_dir():
        return src / "sketch"
    return src if any(SYNSET.match(d.name) for d in list_subdirs(src)) else None


def scan_imagenet(src: Path, options) -> Layout:
    base = _imagenet_base(src)
    layout = Layout(classes=[], domains=[], records=[])
    found, classes, domains = [], set(), []
    for split in ("train", "val"):
        if not (base / split).is_dir():
            continue
        if split == "val" and not any(SYNSET.match(d.name) for d in list_subdirs(base / "val")):
            found += _flat_val(src, base, layout)
            continue
        in_split, synsets = _synset_tree(src, base / split, "imagenet", split, layout)
        found += in_split
        classes |= synsets
    if not found:
        raise LayoutNotFound(f"no ImageNet train/ or val/ folder with images in {base}")
    classes |= {synset for synset, _ in found}
    domains.append("imagenet")
    if (src / "sketch").is_dir():
        sketch, sketch_synsets = _synset_tree(src, src / "sketch", SKETCH_DOMAIN, "test", layout)
        foreign = sorted(sketch_synsets - classes)
        if foreign:
            raise ConvertError(f"{src / 'sketch'}: synsets {foreign[:5]} (of {len(foreign)}) are not ImageNet classes "
                               f"of {base / 'train'} or {base / 'val'}: the sketch labels must be ImageNet's")
        found += sketch
        domains.append(SKETCH_DOMAIN)
    return _finish(found, domains, layout, classes)


def scan_imagenet_sketch(src: Path, options) -> Layout:
    root = _sketch_root(src)
    if root is None:
        raise LayoutNotFound(f"no sketch/ folder and no synset (nXXXXXXXX) folders in {src}")
    layout = Layout(classes=[], domains=[], records=[])
    found, classes = _synset_tree(src, root, SKETCH_DOMAIN, "test", layout)
    if options.pinned_classes is None and len(classes) != ILSVRC_CLASSES:
        # Without ImageNet's list, indices are the sorted synsets found: one missing folder would
        # shift every later class by one, silently wrong for an ImageNet model.
        raise ConvertError(
            f"{root} holds {len(classes)} synset folders, but ImageNet-Sketch has ImageNet-1k's {ILSVRC_CLASSES}: "
            "without all of them the class indices cannot be ImageNet's. Restore the missing folders, pass "
            "--classes-from IMAGENET_SHARDS (a --format imagenet output) to take its class order, or put "
            "sketch/ beside train/ and val/ and convert with --format imagenet")
    return _finish(found, [SKETCH_DOMAIN], layout, classes)
