"""What a format scanner hands to the converter: source records, names, and the problems found.

A scanner (data_prep/formats/*) only reads directory listings and text files; it never opens an
image. Image content problems are found later, while shards are written (data_prep/images.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class ConvertError(Exception):
    """The dataset would be wrong if we went on: the message names the file at fault."""


class LayoutNotFound(ConvertError):
    """--src does not hold the layout --format reads; the converter adds the accepted layouts."""


DEFAULT_VAL_FRACTION = 0.1  # held-out share of each (domain, class) for layouts without a validation split


@dataclass(frozen=True)
class ScanOptions:
    """val_fraction None: not asked for. A layout with official splits then uses them and stops if
    they are missing; a layout without any holds out DEFAULT_VAL_FRACTION."""

    val_fraction: float | None = None
    seed: int = 0
    pinned_classes: tuple[str, ...] | None = None  # --classes-from: the class order to take

    @property
    def holdout_fraction(self) -> float:
        return DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction


@dataclass(frozen=True)
class SourceRecord:
    path: Path  # absolute path of the image file
    src: str  # posix path relative to --src: stored in the sample's `src` field
    domain: str
    label: int  # index into Layout.classes
    split: str  # one of data_prep.SPLITS
    key_hint: str  # "domain/class/stem"-like text the sample key is derived from


@dataclass(frozen=True)
class Problem:
    """One reported input problem.

    kind: a short code (``missing_file``, ``corrupt_image`` ...). action: ``skipped`` (the sample
    or domain is left out), ``warning`` (nothing left out, but the dataset is not as expected),
    ``reencoded`` (kept, image re-encoded losslessly as PNG) or ``renamed`` (key disambiguated).
    --strict turns every ``skipped`` and ``warning`` into an error.
    """

    kind: str
    action: str
    file: str
    detail: str

    def as_dict(self) -> dict:
        return {"kind": self.kind, "action": self.action, "file": self.file, "detail": self.detail}


STRICT_ACTIONS = ("skipped", "warning")


@dataclass
class Layout:
    classes: list[str]
    domains: list[str]
    records: list[SourceRecord]
    problems: list[Problem] = field(default_factory=list)
    holdout: float | None = None  # the fraction a seeded random holdout used, None when none was made

    def skip(self, kind: str, file: str, detail: str) -> None:
        self.problems.append(Problem(kind, "skipped", file, detail))

    def warn(self, kind: str, file: str, detail: str) -> None:
        self.problems.append(Problem(kind, "warning", file, detail))
