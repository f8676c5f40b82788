"""Checkpoints of a run folder: atomic saves that keep the last K, resuming that survives a damaged
checkpoint, the best model (by train.selection), and the lock that keeps one trainer per folder.

Layout of a run folder RUN:
    RUN/.lock                              held (flock) by the main process of the trainer using RUN
    RUN/checkpoints/checkpoint_STEP/       8-digit step; written as .tmp_checkpoint_STEP/ and renamed
                                           once every rank has saved, so a complete-looking folder
                                           is always complete
    RUN/checkpoints/best/                  model.safetensors (unwrapped weights), evaluation.json,
                                           config.yaml; replaced by rename, never rotated away
    RUN/checkpoints/best_averaged/         the same for the averaged model (train.averaging)
A checkpoint holds Accelerate's save_state files: model.safetensors and optimizer.bin, or under
DeepSpeed the folder pytorch_model/ (model states and one ZeRO optimizer shard per rank; on
another number of ranks the shards are re-partitioned while loading, rsc_dist.zero_elastic);
best/ is always whole weights in safetensors, which rsc_dist.evaluate reads without DeepSpeed.

Every failure here that the user can act on is a ``CheckpointError`` (a ``UsageError``: the
trainer prints its one-line message and exits 2).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import pickle
import re
import shutil
import socket
import sys
import zipfile
from pathlib import Path

import torch
import yaml

from rsc_dist.core.contracts import (BEST_AVERAGED_DIR, BEST_AVERAGED_RELATIVE, BEST_DIR, BEST_RELATIVE,
                                     CHECKPOINTS_DIR, CONFIG_FILE, PREEMPTED_MARKER)
from rsc_dist.core.errors import UsageError
from rsc_dist.trainer import zero_elastic
from rsc_dist.trainer.unwrap import whole_state_dict

CHECKPOINT_PATTERN = re.compile(r"^checkpoint_(\d{8})$")
LOCK_FILE = ".lock"
MODEL_FILE = "model.safetensors"
EVALUATION_FILE = "evaluation.json"
BEST_CONFIG_FILE = CONFIG_FILE
# Under DeepSpeed, save_state writes the model and optimizer here: mp_rank_00_model_states.pt
# and one *zero_pp_rank_R_mp_rank_00_optim_states.pt per rank (ZeRO's shards).
DEEPSPEED_DIR = "pytorch_model"

# A RuntimeError from torch's zip writer counts as a full disk only when the disk is this full.
_FULL_DISK_FREE_BYTES = 64 * 2**20


class CheckpointError(UsageError):
    """A checkpoint that cannot be saved or loaded, or a run folder in use; the message says why."""


# ---------------------------------------------------------------------------------------------
# Listing and saving


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders and best/ are ignored)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def save_checkpoint(accelerator, run_dir: Path, step: int, keep: int) -> Path:
    """``save_state`` into a temporary folder, renamed when every rank is done; keep the last K.

    A full disk (on any rank) removes the temporary folder and raises CheckpointError on every
    rank; the earlier complete checkpoints are left as they are.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    final = root / f"checkpoint_{step:08d}"
    temporary = root / f".tmp_checkpoint_{step:08d}"
    failure = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
        except OSError as exc:
            failure = exc
    accelerator.wait_for_everyone()
    if failure is None:
        try:
            with _deepspeed_write_failures_deferred(accelerator) as deferred:
                accelerator.save_state(str(temporary))
            if deferred:
                raise deferred[0]
        except Exception as exc:  # noqa: BLE001 - re-raised below unless it is a full disk
            failure = exc
    # One collective instead of a barrier: a rank whose save failed must not leave the others
    # waiting in wait_for_everyone until the collective timeout.
    if not _all_ranks_ok(accelerator, failure is None):
        error = _save_error(failure, f"checkpoint {step}", final)  # before the space is freed
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        raise error
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def _deepspeed_write_failures_deferred(accelerator):
    """Under DeepSpeed, a file write that fails on one rank (a full disk) is kept for later
    instead of raised: DeepSpeed's save_checkpoint ends with a barrier, which the other ranks
    would wait in until the collective timeout if this rank left the save early. The list
    holds the failures; every DeepSpeed file goes through its checkpoint engine's save."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is None:
        yield []
        return
    writer, failures = wrapped.engine.checkpoint_engine, []
    original = writer.save

    def save(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - raised by the caller after DeepSpeed's barrier
            failures.append(exc)

    own = vars(writer).get("save")  # normally None: save is the class's method
    writer.save = save
    try:
        yield failures
    finally:
        if own is None:
            del writer.save
        else:
            writer.save = own


def _save_error(failure: BaseException | None, what: str, path: Path) -> Exception:
    """The CheckpointError for a failed save (the original exception when it is not a full disk)."""
    if failure is None:
        return CheckpointError(f"saving {what} failed on another rank (its message names the cause); "
                               f"the earlier checkpoints in {path.parent} are kept")
    if is_disk_full(failure, path):
        return CheckpointError(f"no space left on {device_of(path)} while saving {what} to {path}; "
                               "free space and rerun to resume from the previous checkpoint")
    return failure


def is_disk_full(exc: BaseException, path: Path) -> bool:
    """ENOSPC/EDQUOT (also as text, as safetensors reports it), or torch's zip writer's "unexpected pos" (how it reports a full disk) or
    "file write failed" while the filesystem of ``path`` is (nearly) full."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
    text = " ".join(str(link) for link in _chain(exc))
    if "No space left on device" in text or "Disk quota exceeded" in text:  # e.g. safetensors'
        return True  # "I/O error: No space left on device (os error 28)"
    if isinstance(exc, RuntimeError) and ("unexpected pos" in text or "file write failed" in text):
        free = _free_bytes(path)
        return free is not None and free < _FULL_DISK_FREE_BYTES
    return False


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _existing_ancestor(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(_existing_ancestor(path)).free
    except OSError:
        return None


def device_of(path: Path) -> str:
    """"DEVICE (mounted at MOUNT)" for the filesystem holding ``path``, as /proc/mounts names it."""
    path = _existing_ancestor(path)
    try:
        dev = os.stat(path).st_dev
        mount = path
        while mount != mount.parent and os.stat(mount.parent).st_dev == dev:
            mount = mount.parent
    except OSError:
        return str(path)
    source = None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1].replace("\\040", " ") == str(mount):
                source = fields[0]  # the last mount on a mount point is the visible one
    except OSError:
        pass
    return f"{source} (mounted at {mount})" if source else f"the filesystem mounted at {mount}"


def _all_ranks_ok(accelerator, ok: bool) -> bool:
    """True when ``ok`` holds on every rank (one all-reduce; no collective with one process)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


# ---------------------------------------------------------------------------------------------
# Resuming

# What a damaged or incomplete checkpoint raises from accelerator.load_state: a missing file
# (FileNotFoundError), a truncated or corrupt torch file (RuntimeError "PytorchStreamReader
# failed ...", pickle.UnpicklingError, EOFError, zipfile.BadZipFile), a truncated safetensors
# file (SafetensorError), weights of another model (RuntimeError from load_state_dict), a
# TrainState without its keys (KeyError), a missing folder or custom-state count (ValueError,
# RuntimeError).
def _load_errors() -> tuple[type[BaseException], ...]:
    errors: list = [OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError,
                    pickle.UnpicklingError, zipfile.BadZipFile]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - older safetensors
        pass
    return tuple(errors)


def load_for_resume(accelerator, run_dir: Path, resume: str) -> Path | None:
    """Load the checkpoint to resume from into the prepared objects; the one loaded, or None.

    ``resume``: "none" (start fresh), "auto" (the newest complete checkpoint of RUN that loads:
    a damaged newest one is skipped with a warning naming it and what was wrong), or a
    checkpoint folder (that one only). Raises CheckpointError, listing every failure, when no
    candidate loads. All ranks take the same decision (one all-reduce per candidate).
    """
    if resume == "none":
        return None
    if resume == "auto":
        candidates = list(reversed(checkpoint_dirs(run_dir)))
        if not candidates:
            return None
    else:
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        candidates = [path]
    failures: list[str] = []
    for candidate in candidates:
        check_layout(candidate, accelerator)
        # Torch files are checked first (zip CRCs: a flipped byte that torch.load would read
        # without complaint); safetensors files have no checksum, only their header is checked.
        problem, unexpected = find_damaged_file(candidate), None
        try:
            if problem is not None:
                raise _Damaged(problem)
            # A load that fails part-way may already have replaced some of the model, optimizer,
            # scheduler or TrainState: the next candidate's load_state overwrites all of them,
            # and when none loads the run stops, so a half-loaded state is never trained on.
            with _zero_shards_repartitioned(accelerator, candidate, _zero_ranks_if_other(candidate, accelerator)):
                accelerator.load_state(str(candidate))
        except _Damaged:
            pass
        except Exception as exc:  # noqa: BLE001 - agreed on first, so that no rank is left waiting
            if isinstance(exc, CheckpointError):  # a refusal, not damage: every rank stops with it
                problem, unexpected = str(exc), exc
            elif isinstance(exc, _load_errors()) and not isinstance(exc, torch.OutOfMemoryError):
                problem = describe_load_failure(candidate, exc)
            else:
                problem, unexpected = f"{type(exc).__name__}: {exc}", exc
        agreed = _all_ranks_ok(accelerator, problem is None)
        if unexpected is not None:  # not a damaged file (out of memory, a bug): not skipped
            raise unexpected
        if agreed:
            if failures:
                _warn(accelerator, f"WARNING: resuming from {candidate} instead: " + "; ".join(failures))
            return candidate
        failure = f"{candidate} could not be loaded ({problem or 'failed on another rank'})"
        failures.append(failure)
        if problem is not None and not accelerator.is_main_process:  # main's is in its summary
            print(f"WARNING: rank {accelerator.process_index}: {failure}", file=sys.stderr, flush=True)
    listed = "; ".join(failures)
    raise CheckpointError(f"no checkpoint could be loaded: {listed}. Delete or move the damaged "
                          f"checkpoint folder(s), or rerun with --resume none to start over")


def check_layout(checkpoint: Path, accelerator) -> None:
    """Refuse (CheckpointError) a checkpoint this launch cannot load, saying what to run instead:
    DeepSpeed's layout under DDP or the reverse. (ZeRO shards of another number of ranks are
    re-partitioned while loading: zero_elastic.) Every rank sees the same files, so every rank
    refuses alike (no collective)."""
    checkpoint = Path(checkpoint)
    written_by_deepspeed = (checkpoint / DEEPSPEED_DIR).is_dir()
    written_by_ddp = (checkpoint / MODEL_FILE).exists() or (checkpoint / "optimizer.bin").exists()
    launched_with_deepspeed = accelerator.state.deepspeed_plugin is not None
    # (a folder with neither layout is damage, which find_damaged_file names)
    if (written_by_deepspeed and not launched_with_deepspeed) or (written_by_ddp and launched_with_deepspeed):
        how = "with DeepSpeed" if written_by_deepspeed else "without DeepSpeed (DDP)"
        raise CheckpointError(f"{checkpoint} was written {how} and this launch "
                              f"{'uses' if launched_with_deepspeed else 'does not use'} DeepSpeed: resume with "
                              "the accelerate config that wrote it")


def _zero_ranks_if_other(checkpoint: Path, accelerator) -> int | None:
    """The number of ranks that wrote a DeepSpeed checkpoint when it is not this launch's, else None."""
    deepspeed_dir = Path(checkpoint) / DEEPSPEED_DIR
    if accelerator.state.deepspeed_plugin is None or not deepspeed_dir.is_dir():
        return None
    ranks = zero_elastic.shard_count(deepspeed_dir)
    return ranks if ranks and ranks != accelerator.num_processes else None


@contextlib.contextmanager
def _zero_shards_repartitioned(accelerator, checkpoint: Path, ranks: int | None):
    """Within, accelerator.load_state loads the ZeRO shards of ``ranks`` ranks into this launch's
    partitions (zero_elastic) instead of DeepSpeed's own load, which refuses another world size;
    Accelerate still loads the rest (schedule, TrainState, random states) as it always does."""
    if ranks is None:
        yield
        return
    engine = accelerator.deepspeed_engine_wrapped.engine
    _warn(accelerator, f"{checkpoint} was written by {ranks} rank(s): re-partitioning its ZeRO weights and "
                       f"optimizer state for {accelerator.num_processes}")

    def load_checkpoint(load_dir, tag=None, **_options):
        try:
            zero_elastic.load_repartitioned(engine, Path(load_dir) / (tag or DEEPSPEED_DIR))
        except zero_elastic.ReshardError as exc:
            raise CheckpointError(f"{checkpoint} (ZeRO shards of {ranks} ranks) cannot be re-partitioned for "
                                  f"{accelerator.num_processes}: {exc}; resume it with --num_processes {ranks} "
                                  "and the accelerate config that wrote it") from None
        return load_dir, {}

    engine.load_checkpoint = load_checkpoint  # an instance attribute shadows the class's method
    try:
        yield
    finally:
        del engine.load_checkpoint


class _Damaged(Exception):
    pass


def describe_load_failure(checkpoint: Path, exc: BaseException) -> str:
    """What was wrong, naming the damaged file when one can be found."""
    damaged = find_damaged_file(checkpoint)
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    error = f"{type(exc).__name__}: {first_line[:300]}" if first_line else type(exc).__name__
    return f"{damaged}; {error}" if damaged else error


def find_damaged_file(checkpoint: Path) -> str | None:
    """The file at fault, or None: a missing model, optimizer or training-state file, an empty
    file, a safetensors file whose header is wrong, a torch (zip) file that is truncated or
    fails its CRC check (this reads the torch files once)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / MODEL_FILE).exists() and not (checkpoint / "pytorch_model.bin").exists() \
            and not (checkpoint / DEEPSPEED_DIR).is_dir():
        return f"{MODEL_FILE} is missing"
    if not (checkpoint / "optimizer.bin").exists() and not (checkpoint / DEEPSPEED_DIR).is_dir():
        return "optimizer.bin is missing"
    if not any(checkpoint.glob("custom_checkpoint_*.pkl")):
        return "custom_checkpoint_0.pkl (the training state) is missing"
    deepspeed_dir = checkpoint / DEEPSPEED_DIR
    if deepspeed_dir.is_dir():
        if not any(deepspeed_dir.glob("*model_states.pt")):
            return f"{DEEPSPEED_DIR}/mp_rank_00_model_states.pt is missing"
        shards = len(list(deepspeed_dir.glob("*zero_pp_rank_*_optim_states.pt")))
        ranks = len(list(checkpoint.glob("random_states_*.pkl")))
        if shards != ranks:
            return f"{DEEPSPEED_DIR} holds {shards} ZeRO optimizer shard(s) for {ranks} ranks"
    # DeepSpeed's files (one optimizer shard per rank, read by that rank only) are checked by
    # every rank: a damaged shard is then skipped by all ranks alike, before any of them loads
    # and enters the collectives of a load that another rank has abandoned.
    files = [*sorted(checkpoint.iterdir()), *(sorted(deepspeed_dir.iterdir()) if deepspeed_dir.is_dir() else [])]
    for path in files:
        if not path.is_file():
            continue
        name = path.relative_to(checkpoint).as_posix()
        try:
            if path.stat().st_size == 0:
                return f"{name} is empty"
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            elif path.suffix in (".bin", ".pkl", ".pt"):
                if not zipfile.is_zipfile(path):
                    return f"{name} is truncated or not a torch file"
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad:
                    return f"{name} is corrupt (bad CRC in {bad})"
        except Exception as exc:  # noqa: BLE001 - any failure here names this file
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            return f"{name} is damaged ({reason})"
    return None


def _warn(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


def mark_preempted(accelerator, run_dir: Path, step: int, reason: str) -> None:
    if accelerator.is_main_process:
        (run_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": step, "reason": reason}) + "\n")


# ---------------------------------------------------------------------------------------------
# The best model


def save_best(accelerator, model, run_dir: Path, evaluation: dict, config_dict: dict, *,
              folder: str = BEST_DIR, state_dict: dict | None = None) -> str:
    """Write RUN/checkpoints/FOLDER/ (weights, the evaluation that chose them, the resolved
    config): the prepared ``model``'s weights, or ``state_dict`` when given (whole tensors).

    Call on every rank (``get_state_dict`` is a collective under DeepSpeed ZeRO-3); only the
    main process writes. The folder is written as a temporary sibling and swapped in by rename,
    so it always holds one complete model. Returns "checkpoints/FOLDER" (relative to RUN).
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / CHECKPOINTS_DIR
    final, temporary, previous = root / folder, root / f".tmp_{folder}", root / f".old_{folder}"
    if state_dict is None:
        state_dict = whole_state_dict(accelerator, model)
    failure = None
    if accelerator.is_main_process:
        try:
            _recover_best(root, folder)
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            save_file(_plain_tensors(state_dict), str(temporary / MODEL_FILE), metadata={"format": "pt"})
            (temporary / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n")
            (temporary / BEST_CONFIG_FILE).write_text(yaml.safe_dump(config_dict, sort_keys=False))
            _fsync_dir_files(temporary)
            # Two renames (a folder cannot be renamed over a non-empty one); a crash between
            # them leaves .old_FOLDER, which _recover_best (and rsc_dist.evaluate) put back.
            if final.exists():
                shutil.rmtree(previous, ignore_errors=True)
                final.rename(previous)
            temporary.rename(final)
            shutil.rmtree(previous, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - OSError, SafetensorError; re-raised below
            failure = _save_error(exc, f"the best model (step {evaluation.get('step', '?')})", final)
            shutil.rmtree(temporary, ignore_errors=True)
            _recover_best(root, folder)
    del state_dict
    if not _all_ranks_ok(accelerator, failure is None):
        raise failure or _save_error(None, "the best model", final)
    return f"{CHECKPOINTS_DIR}/{folder}"


def _recover_best(root: Path, folder: str = BEST_DIR) -> None:
    """Put back FOLDER (best/) when a crash came between save_best's two renames."""
    previous, final = root / f".old_{folder}", root / folder
    if previous.is_dir() and not final.exists():
        previous.rename(final)


def _plain_tensors(state_dict: dict) -> dict:
    """CPU, contiguous, unshared tensors (safetensors refuses tensors sharing memory)."""
    plain, seen = {}, set()
    for key, value in state_dict.items():
        tensor = value.detach().to("cpu")
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        plain[key] = tensor.contiguous()
    return plain


def _fsync_dir_files(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------
# One trainer per run folder


class RunLock:
    """An exclusive lock on RUN/.lock for the life of a trainer (``with RunLock(run_dir): ...``).

    ``flock`` is released by the kernel when its holder exits for any reason (kill -9 included),
    so a dead trainer never leaves the folder locked. The file holds the holder's pid, host and
    start time, for the message another trainer gets. On a filesystem without flock (some
    Lustre mounts) the lock is skipped with a warning.
    """

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.enabled = enabled  # False: a no-op lock (the ranks other than the main process)
        self._fd: int | None = None
        self._acquired = False

    def acquire(self) -> "RunLock":
        """Take the lock (once; a second call is a no-op); CheckpointError when it is held."""
        if self._acquired or not self.enabled:
            self._acquired = True
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_holder(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CheckpointError(f"run folder {self.run_dir} is in use by {holder}; wait for it "
                                      "or use another --output_dir") from None
            print(f"WARNING: cannot lock {self.path} ({exc.strerror}); not checking whether another "
                  "trainer uses this run folder", file=sys.stderr, flush=True)
            self._acquired = True
            return self
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd
        self._acquired = True
        return self

    def release(self) -> None:
        self._acquired = False
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.ftruncate(fd, 0)  # the file stays (removing it would race with a new taker)
            finally:
                os.close(fd)  # closing the last descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"pid {record['pid']} on {record['host']} (started {record['started']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (no pid recorded yet)"


def lock_run(accelerator, run_dir: Path) -> RunLock:
    """Take RUN's lock on the main process; every rank raises CheckpointError when it is held.

    Call on every rank before anything is written to RUN, and hold the result for the run:
    ``with checkpoints.lock_run(accelerator, run_dir): ...`` (on the other ranks it is a no-op).
    """
    lock, failure = RunLock(run_dir, enabled=accelerator.is_main_process), None
    try:
        lock.acquire()
    except CheckpointError as exc:
        failure = exc
    if not _all_ranks_ok(accelerator, failure is None):
        raise failure or CheckpointError(f"run folder {run_dir} is in use by another trainer "
                                         "(see the main process's message)")
    return lock
