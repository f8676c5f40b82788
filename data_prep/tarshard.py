"""Deterministic webdataset tar shards: writing one, and reading one back sample by sample.

Same samples in, same bytes out: ustar headers with mtime 0, mode 0644, uid/gid 0 and empty
user/group names, members in the order given. Member names are "{key}.{ext}" with a dot-free key
(webdataset takes everything before the FIRST dot of the name as the key).

Sample offsets (manifest format_version 2): a sample is a run of consecutive members sharing a key
(a repeated extension starts a new sample, as in webdataset). offsets[i] is the byte offset of the
first header of sample i and offsets[n] the offset just past the padded data of the last member
(where the end-of-archive zero blocks start), so sample i is exactly bytes
[offsets[i], offsets[i + 1]) of the shard; :func:`parse_sample_span` turns those bytes back into
{"__key__": key, "jpg": ..., "cls": ..., ...} without tarfile.
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


class _SampleBoundaries:
    """Feed member names in order; `starts` says which begin a new sample (key change or repeated extension)."""

    def __init__(self):
        self.key: str | None = None
        self.extensions: set[str] = set()

    def starts(self, name: str) -> bool:
        key, extension = split_member_name(name)
        new = key != self.key or extension in self.extensions
        if new:
            self.key, self.extensions = key, set()
        self.extensions.add(extension)
        return new


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> list[int]:
    """Write the members; return the sample offsets (see the module doc; [0] when there is no member)."""
    offsets: list[int] = []
    boundaries = _SampleBoundaries()
    with open(path, "wb") as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if boundaries.starts(name):
                offsets.append(tar.offset)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
        offsets.append(tar.offset)  # past the last member's padding; close() appends the zero blocks
    return offsets


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


def scan_sample_offsets(path: Path) -> list[int]:
    """The sample offsets of a finished tar, from its headers only (tarfile seeks over member data).

    Raises ValueError naming the problem for a member that is not a regular file, and
    tarfile.TarError / EOFError / OSError for an unreadable archive.
    """
    offsets: list[int] = []
    boundaries = _SampleBoundaries()
    end = 0
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                raise ValueError(f"{path}: member {member.name!r} at byte {member.offset} is not a regular file")
            if boundaries.starts(member.name):
                offsets.append(member.offset)
            end = member.offset_data + _member_bytes(member.size) - TAR_BLOCK
    return offsets + [end]


def parse_sample_span(data: bytes) -> dict[str, bytes | str]:
    """The bytes [offsets[i], offsets[i + 1]) of a shard -> {"__key__": key, ext: bytes, ...}.

    Parses the 512-byte ustar headers itself (checksums checked by tarfile.TarInfo.frombuf). Raises
    ValueError naming the problem for a span that is not exactly the whole members of one sample.
    """
    sample: dict[str, bytes | str] = {}
    offset = 0
    while offset < len(data):
        header = bytes(data[offset: offset + TAR_BLOCK])
        if len(header) < TAR_BLOCK:
            raise ValueError(f"sample span: header at byte {offset} is cut short ({len(header)} of {TAR_BLOCK} bytes)")
        if header == bytes(TAR_BLOCK):
            raise ValueError(f"sample span: zero block at byte {offset} (end of archive inside the span)")
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as error:
            raise ValueError(f"sample span: bad tar header at byte {offset}: {error}") from None
        if info.type not in (tarfile.REGTYPE, tarfile.AREGTYPE):
            raise ValueError(f"sample span: member {info.name!r} at byte {offset} is not a regular file "
                             f"(type {info.type!r})")
        key, extension = split_member_name(info.name)
        if "__key__" not in sample:
            sample["__key__"] = key
        elif key != sample["__key__"]:
            raise ValueError(f"sample span: member {info.name!r} at byte {offset} does not belong to sample "
                             f"{sample['__key__']!r}")
        if extension in sample or extension == "__key__":
            raise ValueError(f"sample span: field {extension!r} of sample {key!r} appears twice")
        start = offset + TAR_BLOCK
        if start + info.size > len(data):
            raise ValueError(f"sample span: member {info.name!r} needs {info.size} bytes, "
                             f"{len(data) - start} are left")
        sample[extension] = bytes(data[start: start + info.size])
        offset = start + _member_bytes(info.size) - TAR_BLOCK
    if offset != len(data):
        raise ValueError(f"sample span: the last member's padding is cut short ({len(data)} bytes, "
                         f"{offset} expected)")
    if not sample:
        raise ValueError("sample span: empty")
    return sample
