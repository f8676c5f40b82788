"""PACS (Li et al., ICCV 2017) in its published layout.

    src/kfold/{art_painting,cartoon,photo,sketch}/{dog,...,person}/*.jpg|png   (or src/{domain}/...)
    src/**/{domain}_train_kfold.txt      "art_painting/dog/pic_001.jpg 1"  -> split "train"
    src/**/{domain}_crossval_kfold.txt                                      -> split "val"
    src/**/{domain}_test_kfold.txt       the whole domain: must equal train + crossval; any extra
                                         images go to split "test"

Paths in the split files are relative to the image root (src/kfold when it exists, else src);
labels are 1-based and class names come from the class folders of the listed paths. Without any
split file the plain folder tree is converted with a seeded holdout (--val-fraction, --seed).
"""
from __future__ import annotations

import re
from pathlib import Path

from data_prep.formats.folders import scan_domain_folders
from data_prep.formats.listed import (records_for, require_disjoint, unique_entries, warn_missing_classes,
                                      warn_unlisted)
from data_prep.listfiles import class_names_from_entries, read_list_file
from data_prep.records import ConvertError, Layout
from data_prep.tree import list_files_recursive, list_subdirs, relative_posix

SPLIT_FILE = re.compile(r"^(?P<domain>.+)_(?P<role>train|crossval|test)_kfold\.txt$")


def find_split_files(src: Path) -> dict[str, dict[str, Path]]:
    by_domain: dict[str, dict[str, Path]] = {}
    for path in list_files_recursive(src):
        match = SPLIT_FILE.match(path.name)
        if not match:
            continue
        roles = by_domain.setdefault(match["domain"], {})
        if match["role"] in roles:
            raise ConvertError(f"two split files named {path.name}: {roles[match['role']]} and {path}")
        roles[match["role"]] = path
    return by_domain


def scan_pacs(src: Path, options) -> Layout:
    image_root = src / "kfold" if (src / "kfold").is_dir() else src
    split_files = find_split_files(src)
    if not split_files:
        return scan_domain_folders(src, list_subdirs(image_root), val_fraction=options.val_fraction, seed=options.seed)

    layout = Layout(classes=[], domains=sorted(split_files), records=[])
    entries = {}
    for domain, roles in sorted(split_files.items()):
        for required in ("train", "crossval"):
            if required not in roles:
                raise ConvertError(f"{domain}_{required}_kfold.txt is missing (found {sorted(roles.values())})")
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
    for folder in list_subdirs(image_root):
        if folder.name not in split_files:
            layout.warn("unlisted_files", relative_posix(folder, src), "folder has no split files; left out")
    warn_missing_classes(layout)
    return layout
