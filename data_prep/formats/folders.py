"""Folder-tree layouts: imagefolder, VLCS, Office-Home, and PACS without split files.

    root/{domain}/{class}/**/image                       -> seeded holdout into train / val
    root/{domain}/{train,crossval|val,test}/{class}/**   -> those splits as they are
                                                            (a "full" folder, the union, is ignored)

Domain names are the folder names made key-safe ("Real World" -> "Real_World"), in sorted order;
classes are the sorted union of class folder names over all domains (one order for all domains).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_prep.holdout import split_holdout
from data_prep.keys import sanitize_key
from data_prep.records import ConvertError, Layout, LayoutNotFound, SourceRecord
from data_prep.tree import list_files_here, list_files_recursive, list_subdirs, relative_posix, stem_path

SPLIT_FOLDERS = {"train": "train", "crossval": "val", "val": "val", "test": "test"}
UNION_FOLDERS = {"full"}  # original VLCS ships full/ = train + crossval + test: reading it would duplicate


@dataclass(frozen=True)
class _Found:
    domain: str
    class_name: str
    path: Path
    split: str | None  # None: decided by the holdout
    hint: str


def _is_split_layout(domain_dir: Path) -> bool:
    names = {d.name for d in list_subdirs(domain_dir)}
    return bool(names) and names <= set(SPLIT_FOLDERS) | UNION_FOLDERS and bool(names & {"train", "test"})


def _scan_class_dirs(src: Path, parent: Path, domain: str, split: str | None, layout: Layout,
                     found: list[_Found]) -> None:
    for stray in list_files_here(parent):
        layout.skip("outside_class_folder", relative_posix(stray, src), f"file is not inside a class folder of {domain!r}")
    for class_dir in list_subdirs(parent):
        for path in list_files_recursive(class_dir):
            hint = f"{domain}/{class_dir.name}/{stem_path(path, class_dir)}"
            if split is not None:
                hint = f"{domain}/{parent.name}/{class_dir.name}/{stem_path(path, class_dir)}"
            found.append(_Found(domain, class_dir.name, path, split, hint))


def scan_domain_folders(src: Path, domain_dirs: list[Path], *, val_fraction: float, seed: int) -> Layout:
    layout = Layout(classes=[], domains=[], records=[])
    found: list[_Found] = []
    names: dict[str, Path] = {}
    for domain_dir in domain_dirs:
        domain = sanitize_key(domain_dir.name)
        if domain in names:
            raise ConvertError(f"{domain_dir} and {names[domain]} both give domain name {domain!r}")
        names[domain] = domain_dir
        if _is_split_layout(domain_dir):
            for split_dir in list_subdirs(domain_dir):
                if split_dir.name in SPLIT_FOLDERS:
                    _scan_class_dirs(src, split_dir, domain, SPLIT_FOLDERS[split_dir.name], layout, found)
        else:
            _scan_class_dirs(src, domain_dir, domain, None, layout, found)

    layout.classes = sorted({f.class_name for f in found})
    class_index = {name: i for i, name in enumerate(layout.classes)}
    for domain, domain_dir in sorted(names.items()):
        in_domain = [f for f in found if f.domain == domain]
        if not in_domain:
            layout.skip("empty_domain", relative_posix(domain_dir, src), "domain folder holds no files; domain left out")
            continue
        layout.domains.append(domain)
        for missing in sorted(set(layout.classes) - {f.class_name for f in in_domain}):
            layout.warn("class_missing", relative_posix(domain_dir, src), f"class {missing!r} has no files in domain {domain!r}")

    records = [SourceRecord(f.path, relative_posix(f.path, src), f.domain, class_index[f.class_name],
                            f.split or "", f.hint) for f in found]
    fixed = [r for r in records if r.split]
    undecided = [r for r in records if not r.split]
    if undecided:
        layout.holdout = val_fraction
    layout.records = sorted(fixed + split_holdout(undecided, fraction=val_fraction, seed=seed), key=lambda r: r.src)
    return layout


def _named_domain_dirs(src: Path, root: Path, expected_sets: list[tuple[str, ...]], layout_name: str):
    """The expected domain folders that exist under root (the best-matching naming wins)."""
    present = {d.name: d for d in list_subdirs(root)}
    expected = max(expected_sets, key=lambda names: sum(n in present for n in names))
    dirs = [present[name] for name in expected if name in present]
    if not dirs:
        raise LayoutNotFound(f"no {layout_name} domain folder in {root}: expected "
                             f"{' or '.join('{' + ','.join(names) + '}' for names in expected_sets)}")
    return dirs, [n for n in expected if n not in present], sorted(set(present) - set(expected))


def _scan_named(src: Path, root: Path, expected_sets, layout_name: str, options) -> Layout:
    dirs, missing, unexpected = _named_domain_dirs(src, root, expected_sets, layout_name)
    layout = scan_domain_folders(src, dirs, val_fraction=options.holdout_fraction, seed=options.seed)
    for name in missing:
        layout.warn("domain_missing", relative_posix(root, src) + "/" + name, f"{layout_name} domain folder is missing")
    for name in unexpected:
        layout.warn("unexpected_folder", relative_posix(root / name, src), f"not a {layout_name} domain; ignored")
    return layout


def scan_imagefolder(src: Path, options) -> Layout:
    """Any src/{domain}/{class}/**/image tree; every non-hidden top-level folder is a domain."""
    layout_root_files = list_files_here(src)
    domain_dirs = list_subdirs(src)
    if not domain_dirs:
        raise LayoutNotFound(f"no domain folder in {src}")
    layout = scan_domain_folders(src, domain_dirs, val_fraction=options.holdout_fraction, seed=options.seed)
    for stray in layout_root_files:
        layout.skip("outside_class_folder", relative_posix(stray, src), "file is not inside a domain folder")
    return layout


VLCS_DOMAINS = [("Caltech101", "LabelMe", "SUN09", "VOC2007"),  # DomainBed
                ("CALTECH", "LABELME", "PASCAL", "SUN")]  # original release / Dassl
OFFICE_HOME_DOMAINS = [("Art", "Clipart", "Product", "Real World"), ("Art", "Clipart", "Product", "Real_World")]


def scan_vlcs(src: Path, options) -> Layout:
    root = src / "VLCS" if (src / "VLCS").is_dir() else src
    return _scan_named(src, root, VLCS_DOMAINS, "VLCS", options)


def scan_office_home(src: Path, options) -> Layout:
    root = src / "OfficeHomeDataset_10072016" if (src / "OfficeHomeDataset_10072016").is_dir() else src
    return _scan_named(src, root, OFFICE_HOME_DOMAINS, "Office-Home", options)
