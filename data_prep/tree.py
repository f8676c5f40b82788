"""Directory listing helpers shared by the format scanners.

Hidden entries (names starting with ".", e.g. .DS_Store, ._AppleDouble) are ignored without a
report: they are file-system metadata, never dataset images. Every other file found in a class
folder is a candidate image; files that are not images are skipped and reported when shards are
written. Listings are sorted so that the output never depends on directory order.

Symlinked folders are followed, but never into a loop and never twice: a link whose target is the
folder it sits in or one above it (``ln -s .. cat/loop``) is skipped as ``symlink_loop``, and a
second way into a real folder already listed by the same walk is skipped as ``duplicate_dir``
(real folders are listed before linked ones, so the real path wins). Problems found while listing
go to the collector opened by :func:`collect_listing_problems` (the converter opens one around
each scan); without one they are dropped.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

from data_prep.records import Problem


class _Collector:
    def __init__(self, src: Path):
        self.src = src
        self.problems: list[Problem] = []
        self._seen: set[tuple[str, str]] = set()

    def add(self, kind: str, path: Path, detail: str) -> None:
        try:
            file = path.relative_to(self.src).as_posix()
        except ValueError:
            file = str(path)
        if (kind, file) not in self._seen:  # several scans may list the same folder
            self._seen.add((kind, file))
            self.problems.append(Problem(kind, "skipped", file, detail))


_collector: ContextVar[_Collector | None] = ContextVar("data_prep_listing_problems", default=None)


@contextmanager
def collect_listing_problems(src: Path) -> Iterator[list[Problem]]:
    """Collect the problems every listing below finds (paths reported relative to src)."""
    collector = _Collector(Path(src))
    token = _collector.set(collector)
    try:
        yield collector.problems
    finally:
        _collector.reset(token)


def _report(kind: str, path: Path, detail: str) -> None:
    collector = _collector.get()
    if collector is not None:
        collector.add(kind, path, detail)


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def relative_posix(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _loops(link: Path, real_parent: str) -> str | None:
    """The real target of a symlinked folder when following it would loop (it holds real_parent)."""
    target = os.path.realpath(link)
    return target if _is_within(real_parent, target) else None


def list_subdirs(directory: Path) -> list[Path]:
    """Non-hidden subfolders, sorted; a symlinked one that loops back to `directory` is skipped."""
    found, real = [], None
    for path in sorted(directory.iterdir(), key=lambda p: p.name):
        if is_hidden(path.name) or not path.is_dir():
            continue
        if path.is_symlink():
            real = real or os.path.realpath(directory)
            target = _loops(path, real)
            if target is not None:
                _report("symlink_loop", path, f"symlink to {target}, a folder that contains it; not followed")
                continue
        found.append(path)
    return found


def list_files_recursive(directory: Path) -> list[Path]:
    """Every non-hidden file below `directory` (symlinked folders followed once, loops skipped), sorted.

    Real folders are walked first and symlinked ones after, each real folder at most once; links
    that point at a folder containing themselves are reported as `symlink_loop`, further links to
    an already listed real folder as `duplicate_dir`. Non-folders (also dangling links) count as
    files, so that they are reported as unreadable later rather than silently left out.
    """
    found: list[Path] = []
    visited: set[str] = set()
    links: list[tuple[Path, str]] = []  # (link path, real path of the folder holding it)
    pending: list[tuple[Path, str]] = [(directory, os.path.realpath(directory))]

    def walk(start: Path, real_start: str) -> None:
        stack = [(start, real_start)]
        while stack:
            folder, real = stack.pop()
            if real in visited:
                _report("duplicate_dir", folder, f"second way into {real}, already listed; not followed")
                continue
            visited.add(real)
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as error:
                _report("unreadable", folder, f"cannot list folder: {error.strerror or error}")
                continue
            for entry in entries:
                if is_hidden(entry.name):
                    continue
                path = Path(folder) / entry.name
                try:
                    is_dir = entry.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    found.append(path)
                elif entry.is_symlink():
                    links.append((path, real))
                else:
                    stack.append((path, os.path.join(real, entry.name)))

    while pending:
        walk(*pending.pop(0))
        for link, real_parent in links:
            target = _loops(link, real_parent)
            if target is not None:
                _report("symlink_loop", link, f"symlink to {target}, a folder that contains it; not followed")
            else:
                pending.append((link, os.path.realpath(link)))
        links.clear()
    return sorted(found, key=lambda p: p.as_posix())


def list_files_here(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_file() and not is_hidden(p.name)),
                  key=lambda p: p.name)


def stem_path(path: Path, base: Path) -> str:
    """'a/b/pic.001.jpg' relative to base -> 'a/b/pic.001': the key hint keeps all but the suffix."""
    relative = path.relative_to(base)
    return (relative.parent / relative.stem).as_posix() if relative.suffix else relative.as_posix()
