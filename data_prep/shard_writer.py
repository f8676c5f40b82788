"""Build one planned shard (runs in a worker process): check each image, write the tar under a
temporary name, rename it into place only when complete, and record the result next to it so an
interrupted or repeated conversion can reuse the shard instead of rebuilding it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from data_prep.images import AcceptedImage, prepare_image
from data_prep.manifest import write_json_atomic
from data_prep.plan import ShardJob
from data_prep.records import Problem
from data_prep.tarshard import sample_members, scan_sample_offsets, write_tar

STATE_DIR = ".data_prep"  # {out}/.data_prep/{domain}/{split}-NNNNNN.json: what each shard holds


@dataclass(frozen=True)
class ShardResult:
    file: str
    num_samples: int
    num_bytes: int
    sha256: str
    problems: tuple[Problem, ...]
    reused: bool = False
    sample_offsets: tuple[int, ...] = ()  # num_samples + 1 byte offsets (see tarshard); () without a shard

    def as_state(self, fingerprint: str) -> dict:
        return {"fingerprint": fingerprint, "file": self.file, "num_samples": self.num_samples,
                "num_bytes": self.num_bytes, "sha256": self.sha256, "sample_offsets": list(self.sample_offsets),
                "problems": [p.as_dict() for p in self.problems]}


def state_path(out: Path, job: ShardJob) -> Path:
    return out / STATE_DIR / (job.file[: -len(".tar")] + ".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def reusable_result(out: Path, job: ShardJob) -> ShardResult | None:
    """The recorded result when the shard on disk is complete and built from the same inputs."""
    try:
        state = json.loads(state_path(out, job).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != job.fingerprint():
        return None
    offsets = tuple(state.get("sample_offsets") or ())
    if state["num_samples"]:
        shard = out / job.file
        if not shard.is_file() or shard.stat().st_size != state["num_bytes"] or file_sha256(shard) != state["sha256"]:
            return None
        if len(offsets) != state["num_samples"] + 1:  # a state written before offsets were recorded
            try:
                offsets = tuple(scan_sample_offsets(shard))
            except (tarfile.TarError, EOFError, OSError, ValueError):
                return None
            if len(offsets) != state["num_samples"] + 1:
                return None
    problems = tuple(Problem(**p) for p in state["problems"])
    return ShardResult(state["file"], state["num_samples"], state["num_bytes"], state["sha256"], problems, reused=True,
                       sample_offsets=offsets)


def _read_and_check(path: Path, max_pixels: int):
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, ("unreadable", f"{type(error).__name__}: {error.strerror or error}")
    verdict = prepare_image(data, max_pixels=max_pixels)
    if isinstance(verdict, AcceptedImage):
        return verdict, None
    return None, (verdict.kind, verdict.detail)


def build_shard(out: Path, job: ShardJob) -> ShardResult:
    problems: list[Problem] = []
    accepted: list[str] = []

    def members():  # streamed into the tar: memory stays at one image, whatever the shard size
        for sample in job.samples:
            image, rejection = _read_and_check(sample.record.path, job.max_pixels)
            if rejection:
                problems.append(Problem(rejection[0], "skipped", sample.record.src, rejection[1]))
                continue
            if image.reencoded_from:
                problems.append(Problem("unsupported_format", "reencoded", sample.record.src,
                                        f"{image.reencoded_from} re-encoded losslessly as RGB PNG"))
            accepted.append(sample.key)
            yield from sample_members(sample.key, image.extension, image.data, label=sample.record.label,
                                      domain_index=sample.domain_index, src=sample.record.src)

    final = out / job.file
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    offsets = write_tar(temporary, members())
    if accepted:
        os.replace(temporary, final)
        result = ShardResult(job.file, len(accepted), final.stat().st_size, file_sha256(final), tuple(problems),
                             sample_offsets=tuple(offsets))
    else:  # every image was skipped: no file, and the manifest will not list it
        temporary.unlink()
        final.unlink(missing_ok=True)
        result = ShardResult(job.file, 0, 0, "", tuple(problems))
    state = state_path(out, job)
    state.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state, result.as_state(job.fingerprint()))
    return result


def reuse_or_build(out: Path, job: ShardJob) -> ShardResult:
    return reusable_result(out, job) or build_shard(out, job)
