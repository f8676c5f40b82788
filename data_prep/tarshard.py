"""Deterministic webdataset tar shards: writing one, and reading one back sample by sample.

Same samples in, same bytes out: ustar headers with mtime 0, mode 0644, uid/gid 0 and empty
user/group names, members in the order given. Member names are "{key}.{ext}" with a dot-free key
(webdataset takes everything before the FIRST dot of the name as the key).
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to whole records


def sample_members(key: str, image_extension: str, image: bytes, *, label: int, domain_index: int,
                   src: str) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.{image_extension}", image),
        (f"{key}.cls", str(label).encode("ascii")),
        (f"{key}.dom", str(domain_index).encode("ascii")),
        (f"{key}.src", src.encode("utf-8")),
    ]


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    with open(path, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def _member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def estimated_sample_bytes(image_size: int, src: str) -> int:
    """Tar bytes one sample takes (exact for the bytes copied as they are)."""
    small = _member_bytes(8) * 2 + _member_bytes(len(src.encode("utf-8")))
    return _member_bytes(image_size) + small


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset's rule: key = up to the first dot of the file name, extension = the rest."""
    directory, _, base = name.rpartition("/")
    key, _, extension = base.partition(".")
    return (f"{directory}/{key}" if directory else key), extension


def iter_tar_samples(path: Path) -> Iterator[dict[str, bytes | str]]:
    """Yield {"__key__": key, ext: bytes, ...} per run of consecutive members sharing a key.

    A repeated extension starts a new sample, so a duplicated member shows up as a duplicate key.

    Raises tarfile.TarError (or EOFError) on a truncated or corrupt archive.
    """
    current: dict[str, bytes | str] | None = None
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, extension = split_member_name(member.name)
            if current is not None and (current["__key__"] != key or extension in current):
                yield current
                current = None
            if current is None:
                current = {"__key__": key}
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"member {member.name} is cut short")
            current[extension] = data
    if current is not None:
        yield current
