"""A full disk while DeepSpeed saves, on one rank only: every rank stops with the disk-full
message (no rank left waiting in DeepSpeed's closing barrier until the collective timeout), the
partial checkpoint is removed and the earlier one kept."""

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from support.deepspeed import deepspeed_launch_env, fresh_accelerate_state
from support.dist_utils import run_on_ranks
from support.trainer_fixtures import REPO

CLASSES = 5

pytest.importorskip("deepspeed")


def _save_with_a_full_disk_on_rank_1(rank, world_size, run_dir):
    from rsc_dist.config import load_config
    from rsc_dist.trainer import build, checkpoints

    os.environ.update(deepspeed_launch_env(REPO / "launch" / "accelerate" / "deepspeed_zero2.yaml"))
    fresh_accelerate_state()
    config = load_config("demo", ["--model.arch=resnet18", "--wandb.mode=disabled"])
    accelerator = build.make_accelerator(config, Path(run_dir))
    plan = SimpleNamespace(manifest=SimpleNamespace(num_classes=CLASSES), total_steps=4, domains=("a", "b"),
                           source_indices=(0, 1),
                           local_forward_batch=2, global_forward_batch=2 * world_size)
    build.training_objects(config, plan, accelerator)
    checkpoints.save_checkpoint(accelerator, Path(run_dir), 1, keep=2)
    writer = accelerator.deepspeed_engine_wrapped.engine.checkpoint_engine
    real_save = writer.save

    def full_disk_for_shards(state_dict, path, *args, **kwargs):
        if rank == 1 and "optim_states" in str(path):
            real_save(state_dict, path, *args, **kwargs)  # half written when the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(state_dict, path, *args, **kwargs)

    writer.save = full_disk_for_shards
    with pytest.raises(checkpoints.CheckpointError) as raised:
        checkpoints.save_checkpoint(accelerator, Path(run_dir), 2, keep=2)
    Path(run_dir, f"error{rank}.txt").write_text(str(raised.value))


@pytest.mark.slow
def test_full_disk_on_one_rank_during_a_deepspeed_save(tmp_path):
    run_on_ranks(_save_with_a_full_disk_on_rank_1, 2, str(tmp_path), env_init=True, timeout=240)
    assert "no space left on" in (tmp_path / "error1.txt").read_text()
    assert "saving checkpoint 2 failed on another rank" in (tmp_path / "error0.txt").read_text()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint_00000001"]
    assert len(list((tmp_path / "checkpoints" / "checkpoint_00000001" / "pytorch_model").glob("*optim_states.pt"))) == 2
