"""DomainNet (Peng et al., ICCV 2019) in its published layout.

    src/{clipart,infograph,painting,quickdraw,real,sketch}/{class}/{domain}_{id}_{id}.jpg
    src/{domain}_train.txt   "clipart/aircraft_carrier/clipart_001_000018.jpg 0"  (0-based labels)
    src/{domain}_test.txt

The published train list is divided by a seeded stratified holdout into "train" and "val"
(--val-fraction, default 0.1; 0 keeps it whole); the published test list becomes "test" untouched.
Class names come from the class folders of the listed paths, indexed by the published labels.
"""
from __future__ import annotations

import re
from pathlib import Path

from data_prep.formats.listed import (records_for, require_disjoint, unique_entries, warn_missing_classes,
                                      warn_unlisted)
from data_prep.holdout import split_holdout
from data_prep.listfiles import class_names_from_entries, read_list_file
from data_prep.records import Layout, LayoutNotFound
from data_prep.tree import list_files_here

LIST_FILE = re.compile(r"^(?P<domain>[A-Za-z0-9]+)_(?P<role>train|test)\.txt$")


def scan_domainnet(src: Path, options) -> Layout:
    lists: dict[str, dict[str, Path]] = {}
    for path in list_files_here(src):
        match = LIST_FILE.match(path.name)
        if match:
            lists.setdefault(match["domain"], {})[match["role"]] = path
    if not lists:
        raise LayoutNotFound(f"no DomainNet list files ({{domain}}_train.txt, {{domain}}_test.txt) in {src}")

    layout = Layout(classes=[], domains=sorted(lists), records=[])
    entries = {domain: {role: unique_entries(read_list_file(path, first_label=0), layout)
                        for role, path in roles.items()}
               for domain, roles in sorted(lists.items())}
    layout.classes = class_names_from_entries([e for roles in entries.values() for es in roles.values() for e in es])

    for domain, roles in sorted(entries.items()):
        for role in ("train", "test"):
            if role not in roles:
                layout.warn("split_file_missing", domain, f"{domain}_{role}.txt is missing")
        train, test = roles.get("train", []), roles.get("test", [])
        require_disjoint(train, test)
        common = dict(src=src, image_root=src, domain=domain, layout=layout)
        layout.records += split_holdout(records_for(train, split="train", **common),
                                        fraction=options.holdout_fraction, seed=options.seed)
        layout.records += records_for(test, split="test", **common)
        warn_unlisted(src=src, image_root=src, domain=domain, listed={e.path for e in train + test}, layout=layout)
    layout.holdout = options.holdout_fraction
    warn_missing_classes(layout)
    return layout
