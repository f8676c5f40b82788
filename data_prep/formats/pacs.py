"""PACS (Li et al., ICCV 2017) in its published layouts.

    images: src/{kfold, pacs_data/pacs_data, pacs_data, images}/{art_painting,cartoon,photo,sketch}/{class}/*
            (the authors' kfold/, pacs_data.zip as it extracts, Dassl's images/) or src/{domain}/...
    splits: src/**/{domain}_train_kfold.txt      "art_painting/dog/pic_001.jpg 1"  -> split "train"
            src/**/{domain}_crossval_kfold.txt                                      -> split "val"
            src/**/{domain}_test_kfold.txt       the whole domain: must equal train + crossval; any
                                                 extra images go to split "test"
            (at the top, or in pacs_label/ as pacs_label.zip extracts, or Dassl's splits/)

Paths in the split files are relative to the image folder: the first of the places above that
holds the domains the split files name. Labels are 1-based and class names come from the class
folders of the listed paths.

The split files ARE the protocol (crossval is the validation set of the paper's model selection),
so without them the conversion stops, naming where it looked, unless --val-fraction asks for a
seeded random holdout of the plain folder tree instead.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from data_prep.formats.folders import scan_domain_folders
from data_prep.formats.listed import (records_for, require_disjoint, unique_entries, warn_missing_classes,
                                      warn_unlisted)
from data_prep.listfiles import class_names_from_entries, read_list_file
from data_prep.records import ConvertError, Layout, LayoutNotFound
from data_prep.tree import is_hidden, list_subdirs, relative_posix

SPLIT_FILE = re.compile(r"^(?P<domain>.+)_(?P<role>train|crossval|test)_kfold\.txt$")
IMAGE_FOLDERS = ("kfold", "pacs_data/pacs_data", "pacs_data", "images", ".")  # first match wins
SPLIT_FILE_NAMES = "{domain}_{train,crossval,test}_kfold.txt"


def find_split_files(src: Path) -> dict[str, dict[str, Path]]:
    """{domain: {role: path}} for every split file below src.

    Only names are looked at: this walk is not an image listing, so a folder reached twice (the
    common `kfold -> pacs_data/pacs_data` link) is simply walked once, with nothing to report.
    """
    by_domain: dict[str, dict[str, Path]] = {}
    visited: set[str] = set()
    for folder, subfolders, files in os.walk(src, followlinks=True):
        real = os.path.realpath(folder)
        if real in visited:
            subfolders[:] = []
            continue
        visited.add(real)
        subfolders[:] = sorted(d for d in subfolders if not is_hidden(d))
        for name in sorted(files):
            match = SPLIT_FILE.match(name)
            if not match:
                continue
            path = Path(folder) / name
            roles = by_domain.setdefault(match["domain"], {})
            if match["role"] in roles:
                raise ConvertError(f"two split files named {name}: {roles[match['role']]} and {path}")
            roles[match["role"]] = path
    return by_domain


def _image_folder(src: Path, domains: list[str]) -> Path | None:
    """The first conventional image folder holding a folder of one of `domains`."""
    for name in IMAGE_FOLDERS:
        folder = src / name
        if folder.is_dir() and any((folder / domain).is_dir() for domain in domains):
            return folder
    return None


def _split_files_near(src: Path) -> Path | None:
    """A folder above src holding split files: --src was probably the image folder."""
    for parent in list(src.parents)[:2]:
        folders = (parent, parent / "pacs_label", parent / "splits")
        if any(SPLIT_FILE.match(path.name) for folder in folders for path in folder.glob("*_kfold.txt")):
            return parent
    return None


def _no_split_files(src: Path) -> LayoutNotFound:
    near = _split_files_near(src)
    hint = f" (there are some in {near}: use --src {near})" if near else ""
    return LayoutNotFound(
        f"no PACS split files {SPLIT_FILE_NAMES} anywhere under {src}{hint}; they define the official "
        "train/crossval split. To convert the folders with a seeded random holdout instead, ask for it: "
        "--val-fraction F (e.g. 0.1, or 0.2 as DomainBed)")


def _scan_folders_with_holdout(src: Path, options) -> Layout:
    candidates = [src / name for name in IMAGE_FOLDERS if (src / name).is_dir()]
    image_root = next((c for c in candidates if list_subdirs(c)), src)
    return scan_domain_folders(src, list_subdirs(image_root), val_fraction=options.val_fraction, seed=options.seed)


def scan_pacs(src: Path, options) -> Layout:
    split_files = find_split_files(src)
    if not split_files:
        if options.val_fraction is None:
            raise _no_split_files(src)
        return _scan_folders_with_holdout(src, options)
    if options.val_fraction is not None:
        files = sorted(str(p) for roles in split_files.values() for p in roles.values())
        raise ConvertError(f"--val-fraction {options.val_fraction:g} asks for a random holdout, but PACS split "
                           f"files define the split ({files[0]} ...): leave --val-fraction out to use them, or "
                           "convert the image folder with --format imagefolder --val-fraction F")

    image_root = _image_folder(src, sorted(split_files))
    if image_root is None:
        looked = ", ".join(str(src / name) for name in IMAGE_FOLDERS)
        raise LayoutNotFound(f"the PACS split files name domains {sorted(split_files)}, but no image folder "
                             f"holds them: looked for {{domain}}/ in {looked}")

    layout = Layout(classes=[], domains=sorted(split_files), records=[])
    entries = {}
    for domain, roles in sorted(split_files.items()):
        for required in ("train", "crossval"):
            if required not in roles:
                raise ConvertError(f"{domain}_{required}_kfold.txt is missing (found {sorted(map(str, roles.values()))})")
        entries[domain] = {role: unique_entries(read_list_file(path, first_label=1), layout)
                           for role, path in roles.items()}
    layout.classes = class_names_from_entries([e for roles in entries.values() for es in roles.values() for e in es])

    for domain, roles in sorted(entries.items()):
        train, crossval, test = roles["train"], roles["crossval"], roles.get("test")
        require_disjoint(train, crossval)
        listed = {e.path for e in train + crossval}
        extra_test = []
        if test is None:
            layout.warn("split_file_missing", domain, f"{domain}_test_kfold.txt is missing; domain = train + crossval")
        else:
            test_paths = {e.path for e in test}
            extra_test = [e for e in test if e.path not in listed]
            not_in_test = sorted(listed - test_paths)
            if not_in_test:
                layout.warn("split_mismatch", str(split_files[domain]["test"]),
                            f"{len(not_in_test)} train/crossval images are not in the test list, e.g. {not_in_test[:5]}")
        common = dict(src=src, image_root=image_root, domain=domain, layout=layout)
        layout.records += records_for(train, split="train", **common)
        layout.records += records_for(crossval, split="val", **common)
        layout.records += records_for(extra_test, split="test", **common)
        warn_unlisted(src=src, image_root=image_root, domain=domain,
                      listed=listed | {e.path for e in extra_test}, layout=layout)
    split_paths = [os.path.realpath(path) for roles in split_files.values() for path in roles.values()]
    for folder in list_subdirs(image_root):
        holds_split_files = any(path.startswith(os.path.realpath(folder) + os.sep) for path in split_paths)
        if folder.name not in split_files and not holds_split_files:  # e.g. pacs_label/ when images are in src
            layout.warn("unlisted_files", relative_posix(folder, src), "folder has no split files; left out")
    warn_missing_classes(layout)
    return layout
