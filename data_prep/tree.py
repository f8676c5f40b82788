"""Directory listing helpers shared by the format scanners.

Hidden entries (names starting with ".", e.g. .DS_Store, ._AppleDouble) are ignored without a
report: they are file-system metadata, never dataset images. Every other file found in a class
folder is a candidate image; files that are not images are skipped and reported when shards are
written. Listings are sorted so that the output never depends on directory order.
"""
from __future__ import annotations

import os
from pathlib import Path


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def relative_posix(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def list_subdirs(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and not is_hidden(p.name)),
                  key=lambda p: p.name)


def list_files_recursive(directory: Path) -> list[Path]:
    """Every non-hidden regular file below `directory` (symlinked folders followed), sorted."""
    found = []
    for parent, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if not is_hidden(d)]
        found += [Path(parent) / name for name in filenames if not is_hidden(name)]
    return sorted(found, key=lambda p: p.as_posix())


def list_files_here(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_file() and not is_hidden(p.name)),
                  key=lambda p: p.name)


def stem_path(path: Path, base: Path) -> str:
    """'a/b/pic.001.jpg' relative to base -> 'a/b/pic.001': the key hint keeps all but the suffix."""
    relative = path.relative_to(base)
    return (relative.parent / relative.stem).as_posix() if relative.suffix else relative.as_posix()
