"""Parsing of "relative/path label" list files (PACS *_kfold.txt, DomainNet *_train.txt).

Labels are integers (1-based in PACS, 0-based in DomainNet); the class NAME of a label comes from
the class folder in the listed path ("domain/class/file"), and must be the same for every line
that uses the label. A line that breaks this is a ConvertError naming the file and line: training
on mislabeled data is worse than stopping.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from data_prep.records import ConvertError


@dataclass(frozen=True)
class ListEntry:
    list_file: Path
    line_number: int
    path: str  # as written, relative to the image root
    label: int  # already shifted to 0-based

    @property
    def where(self) -> str:
        return f"{self.list_file}:{self.line_number}"


def read_list_file(list_file: Path, *, first_label: int) -> list[ListEntry]:
    entries = []
    text = list_file.read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ConvertError(f"{list_file}:{number}: expected 'relative/path label', got {line!r}")
        label = int(parts[1]) - first_label
        if label < 0:
            raise ConvertError(f"{list_file}:{number}: label {parts[1]} is below the first label {first_label}")
        entries.append(ListEntry(list_file, number, parts[0].replace("\\", "/"), label))
    return entries


def class_names_from_entries(entries: list[ListEntry]) -> list[str]:
    """Class names indexed by label, read from the class folder of each listed path."""
    names: dict[int, tuple[str, ListEntry]] = {}
    for entry in entries:
        parts = entry.path.split("/")
        if len(parts) < 3:
            raise ConvertError(f"{entry.where}: path {entry.path!r} is not domain/class/file")
        name = parts[-2]
        seen = names.setdefault(entry.label, (name, entry))
        if seen[0] != name:
            raise ConvertError(f"{entry.where}: label {entry.label} is class {name!r} here but "
                               f"{seen[0]!r} at {seen[1].where}")
    if not names:
        return []
    missing = [label for label in range(max(names) + 1) if label not in names]
    if missing:
        raise ConvertError(f"labels {missing} (0-based) are used by no line of "
                           f"{sorted({str(e.list_file) for e in entries})}: class names unknown")
    by_name: dict[str, int] = {}
    for label, (name, entry) in sorted(names.items()):
        if by_name.setdefault(name, label) != label:
            raise ConvertError(f"{entry.where}: class {name!r} has labels {by_name[name]} and {label}")
    return [names[label][0] for label in range(len(names))]
