"""Sample keys: unique, dot-free, ASCII, short enough for a plain ustar member name.

webdataset splits a member name at its FIRST dot into key and extension, so a key holds only
[A-Za-z0-9_-]; everything else (dots, spaces, slashes, non-ASCII) becomes "_". Two sources that
sanitize to the same text (or a key too long for a tar name) get a short hash of their source path
appended, so keys stay unique and stable across runs.
"""
from __future__ import annotations

import hashlib
import re

from data_prep.records import Problem, SourceRecord

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# ustar names hold 100 bytes; keep room for ".webp" and a hash suffix.
MAX_KEY_LENGTH = 90


def sanitize_key(text: str) -> str:
    return _UNSAFE.sub("_", text.replace("/", "-"))


def _with_hash(key: str, src: str) -> str:
    digest = hashlib.sha256(src.encode("utf-8")).hexdigest()[:10]
    return f"{key[: MAX_KEY_LENGTH - 11]}-{digest}"


def assign_keys(records: list[SourceRecord]) -> tuple[dict[str, str], list[Problem]]:
    """Map each record's src to its key; report keys that had to be disambiguated."""
    wanted: dict[str, list[str]] = {}
    for record in records:
        wanted.setdefault(sanitize_key(record.key_hint), []).append(record.src)
    keys: dict[str, str] = {}
    problems: list[Problem] = []
    for key, sources in wanted.items():
        if len(sources) == 1 and len(key) <= MAX_KEY_LENGTH:
            keys[sources[0]] = key
            continue
        for src in sorted(sources):
            keys[src] = _with_hash(key, src)
            if len(sources) > 1:
                problems.append(Problem("key_collision", "renamed", src,
                                        f"{len(sources)} files sanitize to key {key!r}; using {keys[src]!r}"))
    if len(set(keys.values())) != len(keys):  # a hash collision of 40 bits: stop rather than overwrite
        raise RuntimeError("sample keys are not unique after disambiguation")
    return keys, problems
