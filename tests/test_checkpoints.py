"""Checkpoints that can be trusted: damaged ones skipped on resume, a full disk reported, one
trainer per run folder, the best model kept. Each test injects the fault it guards against."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file

from rsc_dist.core.errors import UsageError
from rsc_dist.trainer import checkpoints, state
from rsc_dist.trainer.checkpoints import CheckpointError

REPO = Path(__file__).resolve().parent.parent


class Trainer:
    """A prepared model, optimizer and TrainState, as rsc_dist.train registers them."""

    def __init__(self, features: int = 8, outputs: int = 3, momentum: float = 0.9):
        self.accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Linear(features, outputs)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.state = state.TrainState()
        self.accelerator.register_for_checkpointing(self.state)
        self.features = features

    def step(self) -> None:
        self.model(torch.randn(4, self.features)).square().sum().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.state.step += 1

    def weights(self) -> dict:
        return {k: v.detach().clone() for k, v in self.accelerator.unwrap_model(self.model).state_dict().items()}


def _train_and_save(run_dir: Path, steps=(1, 2), keep: int = 5) -> tuple[Trainer, dict]:
    trainer = Trainer()
    saved = {}
    while trainer.state.step < max(steps):
        trainer.step()
        if trainer.state.step in steps:
            checkpoints.save_checkpoint(trainer.accelerator, run_dir, trainer.state.step, keep)
            saved[trainer.state.step] = trainer.weights()
    return trainer, saved


def _ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"checkpoint_{step:08d}"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "model deleted": (lambda c: (c / "model.safetensors").unlink(), "model.safetensors is missing"),
    "model truncated": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is damaged"),
    "model empty": (lambda c: (c / "model.safetensors").write_bytes(b""), "model.safetensors is empty"),
    "optimizer deleted": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    "optimizer truncated": (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin is truncated"),
    "state pickle corrupt": (lambda c: (c / "custom_checkpoint_0.pkl").write_bytes(b"\x80\x04garbage" * 9),
                             "custom_checkpoint_0.pkl is truncated or not a torch file"),
    "state pickle deleted": (lambda c: (c / "custom_checkpoint_0.pkl").unlink(),
                             "custom_checkpoint_0.pkl (the training state) is missing"),
    "optimizer byte flipped": (lambda c: _flip_last_entry_byte(c / "optimizer.bin"), "optimizer.bin"),
}


def _flip_last_entry_byte(path: Path) -> None:
    """Corrupt tensor data inside a torch zip file (torch.load would read it without complaint)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)  # local header
    offset = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_auto_resume_falls_back_from_a_damaged_newest_checkpoint(tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    _, saved = _train_and_save(run_dir)
    hurt, what = DAMAGE[damage]
    hurt(_ckpt(run_dir, 2))

    fresh = Trainer()
    loaded = checkpoints.load_for_resume(fresh.accelerator, run_dir, "auto")

    assert loaded == _ckpt(run_dir, 1)
    assert fresh.state.step == 1
    for name, value in saved[1].items():
        assert torch.equal(fresh.weights()[name], value), name
    warning = capsys.readouterr().err
    assert "WARNING" in warning and str(_ckpt(run_dir, 2)) in warning and what in warning


def test_auto_resume_loads_the_newest_when_it_is_fine(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _, saved = _train_and_save(run_dir)
    fresh = Trainer()
    assert checkpoints.load_for_resume(fresh.accelerator, run_dir, "auto") == _ckpt(run_dir, 2)
    assert fresh.state.step == 2 and "WARNING" not in capsys.readouterr().err
    assert all(torch.equal(fresh.weights()[k], v) for k, v in saved[2].items())


def test_no_loadable_checkpoint_lists_every_failure(tmp_path):
    run_dir = tmp_path / "run"
    _train_and_save(run_dir)
    (_ckpt(run_dir, 2) / "model.safetensors").unlink()
    _truncate(_ckpt(run_dir, 1) / "optimizer.bin")
    with pytest.raises(CheckpointError) as caught:
        checkpoints.load_for_resume(Trainer().accelerator, run_dir, "auto")
    message = str(caught.value)
    assert isinstance(caught.value, UsageError)  # the trainer exits 2
    assert f"{_ckpt(run_dir, 2)} could not be loaded (model.safetensors is missing" in message
    assert f"{_ckpt(run_dir, 1)} could not be loaded (optimizer.bin is truncated" in message
    assert "\n" not in message


def test_resume_none_empty_and_explicit_paths(tmp_path):
    run_dir = tmp_path / "run"
    fresh = Trainer()
    assert checkpoints.load_for_resume(fresh.accelerator, run_dir, "auto") is None  # nothing yet
    _train_and_save(run_dir)
    assert checkpoints.load_for_resume(fresh.accelerator, run_dir, "none") is None and fresh.state.step == 0
    with pytest.raises(CheckpointError, match="--resume /nonexistent/ckpt: no such checkpoint folder"):
        checkpoints.load_for_resume(fresh.accelerator, run_dir, "/nonexistent/ckpt")
    assert checkpoints.load_for_resume(fresh.accelerator, run_dir, str(_ckpt(run_dir, 1))) == _ckpt(run_dir, 1)
    assert fresh.state.step == 1
    # An explicit checkpoint is that one only: no fallback to another.
    (_ckpt(run_dir, 2) / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match="optimizer.bin is missing"):
        checkpoints.load_for_resume(fresh.accelerator, run_dir, str(_ckpt(run_dir, 2)))


# ---------------------------------------------------------------------------------------------
# A full disk


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fault", ["enospc", "torch_unexpected_pos"])
def test_full_disk_removes_the_partial_checkpoint_and_says_so(tmp_path, monkeypatch, fault):
    run_dir = tmp_path / "run"
    trainer, _ = _train_and_save(run_dir, steps=(1, 2))
    before = _snapshot(run_dir / "checkpoints")
    real_save = trainer.accelerator.save_state

    def full_disk(output_dir, **kwargs):
        real_save(output_dir, **kwargs)  # the files are half there when the disk fills
        if fault == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 1200")

    monkeypatch.setattr(trainer.accelerator, "save_state", full_disk)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                        lambda path: usage._replace(free=4096))  # what a full disk reports
    trainer.step()
    with pytest.raises(CheckpointError) as caught:
        checkpoints.save_checkpoint(trainer.accelerator, run_dir, 3, keep=1)
    message = str(caught.value)
    target = run_dir / "checkpoints" / "checkpoint_00000003"
    assert message.startswith("no space left on ") and "(mounted at " in message
    assert f"while saving checkpoint 3 to {target}; free space and rerun to resume" in message
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint_00000001",
                                                                         "checkpoint_00000002"]
    assert _snapshot(run_dir / "checkpoints") == before  # not rotated, not touched


def test_a_torch_write_error_with_free_space_is_not_called_a_full_disk(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trainer, _ = _train_and_save(run_dir, steps=(1,))

    def broken(output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2")

    monkeypatch.setattr(trainer.accelerator, "save_state", broken)
    monkeypatch.setattr(checkpoints.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**12, 10**9, 10**12 - 10**9))
    with pytest.raises(RuntimeError, match="unexpected pos") as caught:
        checkpoints.save_checkpoint(trainer.accelerator, run_dir, 2, keep=3)
    assert not isinstance(caught.value, CheckpointError)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint_00000001"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A 2 MiB tmpfs (root only); skipped where mounting is refused."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


@pytest.mark.parametrize("size", [400, 600])
def test_a_really_full_disk(small_filesystem, size):
    """size 400: ~0.65 MB of weights and as much momentum, the optimizer file (torch's zip
    writer) fills the disk; 600: 1.4 MB of weights, no momentum, the weights (safetensors) do."""
    run_dir = small_filesystem / "run"
    momentum = 0.9 if size == 400 else 0.0
    trainer = Trainer(features=size, outputs=size, momentum=momentum)
    trainer.step()
    checkpoints.save_checkpoint(trainer.accelerator, run_dir, 1, keep=3)
    first = _snapshot(run_dir / "checkpoints")
    weights = trainer.weights()
    trainer.step()
    with pytest.raises(CheckpointError) as caught:
        checkpoints.save_checkpoint(trainer.accelerator, run_dir, 2, keep=3)
    message = str(caught.value)
    assert message.startswith(f"no space left on tmpfs (mounted at {small_filesystem})"), message
    assert f"while saving checkpoint 2 to {_ckpt(run_dir, 2)}; free space and rerun" in message
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["checkpoint_00000001"]
    assert _snapshot(run_dir / "checkpoints") == first
    fresh = Trainer(features=size, outputs=size, momentum=momentum)
    assert checkpoints.load_for_resume(fresh.accelerator, run_dir, "auto") == _ckpt(run_dir, 1)
    assert all(torch.equal(fresh.weights()[k], v) for k, v in weights.items())


def test_best_on_a_really_full_disk_keeps_the_previous_best(small_filesystem):
    run_dir = small_filesystem / "run"
    trainer = Trainer(features=550, outputs=550)  # 1.2 MB of weights: one best/ fits, two do not
    trainer.step()
    checkpoints.save_best(trainer.accelerator, trainer.model, run_dir, {"step": 1, "val_acc": 0.5}, {})
    before = _snapshot(run_dir / "checkpoints")
    trainer.step()
    with pytest.raises(CheckpointError) as caught:
        checkpoints.save_best(trainer.accelerator, trainer.model, run_dir, {"step": 2, "val_acc": 0.6}, {})
    assert str(caught.value) == (
        f"no space left on tmpfs (mounted at {small_filesystem}) while saving the best model (step 2) to "
        f"{run_dir / 'checkpoints' / 'best'}; free space and rerun to resume from the previous checkpoint")
    assert _snapshot(run_dir / "checkpoints") == before


# ---------------------------------------------------------------------------------------------
# One trainer per run folder


def test_a_second_lock_on_a_busy_run_folder_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    with checkpoints.RunLock(run_dir) as lock:
        assert lock.held and (run_dir / ".lock").exists()
        with pytest.raises(CheckpointError) as caught:
            checkpoints.RunLock(run_dir).acquire()
        message = str(caught.value)
        assert message.startswith(f"run folder {run_dir} is in use by pid {os.getpid()} on ")
        assert "(started 20" in message and "wait for it or use another --output_dir" in message
        assert lock.acquire() is lock  # taking it again in the same holder is a no-op
    with checkpoints.RunLock(run_dir):  # released
        pass


def test_lock_run_takes_the_lock_on_the_main_process(tmp_path):
    accelerator = Accelerator(cpu=True)
    with checkpoints.lock_run(accelerator, tmp_path / "run") as lock:
        assert lock.held
        with pytest.raises(CheckpointError, match="is in use by pid"):
            checkpoints.lock_run(accelerator, tmp_path / "run")
    assert not lock.held


def test_a_killed_holder_leaves_no_lock_behind(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            sys.path.insert(0, {str(REPO)!r})
            from rsc_dist.trainer.checkpoints import RunLock
            lock = RunLock({str(run_dir)!r}).acquire()
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CheckpointError, match=f"in use by pid {holder.pid} on "):
            checkpoints.RunLock(run_dir).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with checkpoints.RunLock(run_dir) as lock:  # the kernel released it with the process
        assert lock.held
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------
# The best model


def test_save_best_writes_replaces_and_survives_rotation(tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer()
    trainer.step()
    evaluation = {"step": 1, "val_acc": 0.5, "target_acc": {"sketch": 0.25}}
    config = {"algorithm": "rsc", "data": {"root": "demo", "target": ["sketch"]}}
    assert checkpoints.save_best(trainer.accelerator, trainer.model, run_dir, evaluation, config) \
        == "checkpoints/best"
    best = run_dir / "checkpoints" / "best"
    assert sorted(p.name for p in best.iterdir()) == ["config.yaml", "evaluation.json", "model.safetensors"]
    assert json.loads((best / "evaluation.json").read_text()) == evaluation
    assert yaml.safe_load((best / "config.yaml").read_text()) == config
    assert all(torch.equal(load_file(best / "model.safetensors")[k], v) for k, v in trainer.weights().items())

    # Checkpoints rotate (keep 1) around it; best/ is not one of them.
    for _ in range(3):
        trainer.step()
        checkpoints.save_checkpoint(trainer.accelerator, run_dir, trainer.state.step, keep=1)
    assert [p.name for p in checkpoints.checkpoint_dirs(run_dir)] == ["checkpoint_00000004"]
    assert best.is_dir()

    newer = {"step": 4, "val_acc": 0.75}
    checkpoints.save_best(trainer.accelerator, trainer.model, run_dir, newer, config)
    assert json.loads((best / "evaluation.json").read_text()) == newer
    assert all(torch.equal(load_file(best / "model.safetensors")[k], v) for k, v in trainer.weights().items())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["best", "checkpoint_00000004"]


def test_save_best_on_a_full_disk_keeps_the_previous_best(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    trainer = Trainer()
    trainer.step()
    checkpoints.save_best(trainer.accelerator, trainer.model, run_dir, {"step": 1, "val_acc": 0.5}, {})
    before = _snapshot(run_dir / "checkpoints")

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    trainer.step()
    with pytest.raises(CheckpointError, match=r"^no space left on .* while saving the best model \(step 2\)"):
        checkpoints.save_best(trainer.accelerator, trainer.model, run_dir, {"step": 2, "val_acc": 0.9}, {})
    assert _snapshot(run_dir / "checkpoints") == before


def test_a_crash_between_the_renames_of_best_is_repaired(tmp_path):
    run_dir = tmp_path / "run"
    trainer = Trainer()
    trainer.step()
    checkpoints.save_best(trainer.accelerator, trainer.model, run_dir, {"step": 1, "val_acc": 0.5}, {})
    root = run_dir / "checkpoints"
    (root / "best").rename(root / ".old_best")  # the first rename happened, the second did not
    (root / ".tmp_best").mkdir()
    trainer.step()
    checkpoints.save_best(trainer.accelerator, trainer.model, run_dir, {"step": 2, "val_acc": 0.6}, {})
    assert sorted(p.name for p in root.iterdir()) == ["best"]
    assert json.loads((root / "best" / "evaluation.json").read_text())["step"] == 2


# ---------------------------------------------------------------------------------------------
# Two ranks agree (gloo, spawned processes)


def _two_rank_fallback(rank, world_size, run_dir):
    from rsc_dist.trainer import checkpoints as ck

    trainer = Trainer()
    real_load = trainer.accelerator.load_state

    def rank1_cannot_read_the_newest(path, **kwargs):
        if rank == 1 and path.endswith("checkpoint_00000002"):
            raise OSError(errno.EIO, "Input/output error", path)
        return real_load(path, **kwargs)

    trainer.accelerator.load_state = rank1_cannot_read_the_newest
    loaded = ck.load_for_resume(trainer.accelerator, Path(run_dir), "auto")
    assert loaded.name == "checkpoint_00000001", (rank, loaded)
    assert trainer.state.step == 1


def _two_rank_full_disk(rank, world_size, run_dir):
    from rsc_dist.trainer import checkpoints as ck

    trainer = Trainer()
    real_save = trainer.accelerator.save_state

    def rank1_full(output_dir, **kwargs):
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(output_dir, **kwargs)

    trainer.accelerator.save_state = rank1_full
    trainer.step()
    try:
        ck.save_checkpoint(trainer.accelerator, Path(run_dir), 3, keep=5)
    except ck.CheckpointError as exc:
        expected = "no space left on" if rank == 1 else "failed on another rank"
        assert expected in str(exc), (rank, str(exc))
    else:
        raise AssertionError(f"rank {rank}: no CheckpointError")
    assert not (Path(run_dir) / "checkpoints" / ".tmp_checkpoint_00000003").exists() or rank != 0


def _two_rank_fallback_then_full_disk(rank, world_size, run_dir):
    """Both checks in one launch (the ranks start once), each with its own Trainer."""
    _two_rank_fallback(rank, world_size, run_dir)
    _two_rank_full_disk(rank, world_size, run_dir)


@pytest.mark.slow
def test_two_ranks_agree_on_fallback_and_on_a_full_disk(tmp_path):
    from support.dist_utils import run_on_ranks

    run_dir = tmp_path / "run"
    _train_and_save(run_dir)
    run_on_ranks(_two_rank_fallback_then_full_disk, 2, str(run_dir), env_init=True, timeout=240)
    assert [p.name for p in checkpoints.checkpoint_dirs(run_dir)] == ["checkpoint_00000001",
                                                                     "checkpoint_00000002"]


# ---------------------------------------------------------------------------------------------
# The trainer end to end (needs rsc_dist.train/loop to call load_for_resume, lock_run, save_best)


def _tiny_run(tmp_path, shards, **train):
    from support.trainer_fixtures import tiny_config

    settings = {"max_steps": 4, "eval_every_steps": 2, "checkpoint_every_steps": 2, **train}
    config = tiny_config(tmp_path, shards, train=settings)
    return ["--config", str(config), "--output_dir", str(tmp_path / "run")]


@pytest.mark.slow
def test_trainer_resumes_past_a_damaged_checkpoint_and_keeps_the_best(tmp_path, tiny_shards, capsys):
    from rsc_dist import train

    args = _tiny_run(tmp_path, tiny_shards, max_steps=6, stop_at_step=4)
    assert train.main(args) == 75  # stopped at step 4 with checkpoints 2 and 4
    run_dir = tmp_path / "run"
    assert (run_dir / "checkpoints" / "best" / "model.safetensors").is_file()
    _truncate(_ckpt(run_dir, 4) / "model.safetensors")
    capsys.readouterr()
    assert train.main(args + ["--train.stop_at_step=null"]) == 0
    out, err = capsys.readouterr()
    assert f"resuming from {_ckpt(run_dir, 2)} instead: {_ckpt(run_dir, 4)} could not be loaded " \
           "(model.safetensors is damaged" in err
    assert "at step 2" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["best_checkpoint"] == "checkpoints/best"
    kept = json.loads((run_dir / "checkpoints" / "best" / "evaluation.json").read_text())
    assert kept["step"] == results["best"]["step"] and kept["val_acc"] == results["best"]["val_acc"]


@pytest.mark.slow
def test_trainer_exits_2_when_no_checkpoint_loads(tmp_path, tiny_shards, capsys):
    from rsc_dist import train

    args = _tiny_run(tmp_path, tiny_shards, max_steps=6, stop_at_step=4)  # a stop before the end: exit 75
    assert train.main(args) == 75
    run_dir = tmp_path / "run"
    (_ckpt(run_dir, 4) / "optimizer.bin").unlink()
    (_ckpt(run_dir, 2) / "custom_checkpoint_0.pkl").write_bytes(b"")
    capsys.readouterr()
    assert train.main(args + ["--train.stop_at_step=null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("rsc_dist.train: error: no checkpoint could be loaded: ")
    assert "optimizer.bin is missing" in err and "custom_checkpoint_0.pkl is empty" in err


@pytest.mark.slow
def test_trainer_refuses_a_run_folder_in_use(tmp_path, tiny_shards, capsys):
    from rsc_dist import train

    args = _tiny_run(tmp_path, tiny_shards)
    with checkpoints.RunLock(tmp_path / "run"):
        assert train.main(args) == 2
    err = capsys.readouterr().err
    assert f"run folder {tmp_path / 'run'} is in use by pid {os.getpid()}" in err
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.slow
def test_trainer_on_a_full_disk_exits_2_and_keeps_the_last_checkpoint(tmp_path, tiny_shards, capsys,
                                                                      monkeypatch):
    from rsc_dist import train

    real_save = Accelerator.save_state

    def full_after_the_first(self, output_dir=None, **kwargs):
        if "00000004" in str(output_dir):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", full_after_the_first)
    assert train.main(_tiny_run(tmp_path, tiny_shards)) == 2
    err = capsys.readouterr().err
    assert "no space left on " in err and "while saving checkpoint 4" in err
    assert [p.name for p in checkpoints.checkpoint_dirs(tmp_path / "run")] == ["checkpoint_00000002"]
