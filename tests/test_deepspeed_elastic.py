"""Elastic DeepSpeed resume: ZeRO-1 and ZeRO-2 checkpoints written by 2 ranks continue on 1, and a
ZeRO-3 one written by 1 rank continues on 2 (where a parameter that does not divide evenly is
padded on the last rank), through the trainer's own load (checkpoints.load_for_resume, which
re-partitions with rsc_dist.zero_elastic). SGD with momentum (the configs' optimizer) in every
stage, and Adam under ZeRO-2 (two per-element states and a scalar step).

Right after the load, every parameter's whole fp32 master weight and optimizer state (SGD's
momentum buffer; Adam's two moments), read back through DeepSpeed's own API (safe_get_full_*),
are bit-identical to the writer's at save time, and so are the learning rate and the schedule; two more steps on the same global batches
then end at the weights the writer reached without stopping (to float rounding: the gradient is
reduced over another number of ranks; the largest difference is printed with -s).
"""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from support.deepspeed import deepspeed_launch_env, fresh_accelerate_state
from support.dist_utils import run_on_ranks
from support.synthetic import synthetic_batch
from support.trainer_fixtures import REPO

GLOBAL_BATCH, CLASSES = 8, 5

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.slow
SAVED_AT, MORE = 2, 2
# ((ZeRO stage, optimizer), ...), ranks that write the checkpoints, ranks that resume them; one
# launch runs the variants in turn (Accelerate's state is reset between them).
CASES = [pytest.param(((1, "sgd"), (2, "sgd"), (2, "adam")), 2, 1, id="zero1+2-2to1"),
         pytest.param(((3, "sgd"),), 1, 2, id="zero3-1to2")]
PER_ELEMENT_STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}
LEARNING_RATE = {"sgd": 0.05, "adam": 0.001}


def _objects(stage, name, world_size, run_dir):
    from rsc_dist.config import load_config
    from rsc_dist.trainer import build

    base_env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    os.environ.clear()
    os.environ.update(base_env)
    os.environ.update(deepspeed_launch_env(REPO / "launch" / "accelerate" / f"deepspeed_zero{stage}.yaml"))
    fresh_accelerate_state()
    config = load_config("demo", ["--algorithm=erm", f"--optim.name={name}", f"--optim.lr={LEARNING_RATE[name]}",
                                  "--schedule.warmup_steps=3",
                                  "--model.freeze_bn=true", "--model.channels_last=false", "--wandb.mode=disabled"])
    accelerator = build.make_accelerator(config, Path(run_dir))
    if stage == 3:  # partition every parameter (by default the small ones stay whole on every rank)
        accelerator.state.deepspeed_plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    plan = SimpleNamespace(manifest=SimpleNamespace(num_classes=CLASSES), total_steps=SAVED_AT + MORE,
                           domains=("a", "b"), source_indices=(0, 1), local_forward_batch=GLOBAL_BATCH // world_size,
                           global_forward_batch=GLOBAL_BATCH)
    torch.manual_seed(0)
    trained = build.training_objects(config, plan, accelerator)
    accelerator.register_for_checkpointing(trained.scheduler)
    return config, accelerator, trained


def _train(config, accelerator, trained, steps):
    from rsc_dist.trainer.step import train_on_batch

    local = GLOBAL_BATCH // accelerator.num_processes
    part = slice(accelerator.process_index * local, (accelerator.process_index + 1) * local)
    for step in steps:
        images, labels = synthetic_batch(step, GLOBAL_BATCH, CLASSES)
        train_on_batch(accelerator, trained, config, {"image": images[part], "label": labels[part]}, step, 100)


def _whole_state(config, accelerator, trained):
    """Every parameter's fp32 master weight and optimizer state, gathered by DeepSpeed (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    state = {}
    for name, param in trained.network.named_parameters():
        state[name] = safe_get_full_fp32_param(param).cpu().clone()
        for key in PER_ELEMENT_STATE[config.optim.name]:
            state[f"{name}:{key}"] = safe_get_full_optimizer_state(param, key).cpu().clone()
    return {"tensors": state, "lr": [g["lr"] for g in trained.optimizer.param_groups],
            "schedule": trained.scheduler.state_dict()["last_epoch"]}


def _write(rank, world_size, out, variants):
    from rsc_dist.trainer import checkpoints

    for stage, name in variants:
        run_dir = Path(out) / f"zero{stage}_{name}"
        objects = _objects(stage, name, world_size, run_dir)
        _train(*objects, range(SAVED_AT))
        checkpoints.save_checkpoint(objects[1], run_dir, SAVED_AT, keep=1)
        saved = _whole_state(*objects)
        _train(*objects, range(SAVED_AT, SAVED_AT + MORE))
        final = _whole_state(*objects)
        if rank == 0:
            torch.save({"saved": saved, "final": final}, run_dir / "writer.pt")


def _resume(rank, world_size, out, variants):
    from rsc_dist.trainer import checkpoints

    for stage, name in variants:
        run_dir = Path(out) / f"zero{stage}_{name}"
        objects = _objects(stage, name, world_size, run_dir)
        loaded = checkpoints.load_for_resume(objects[1], run_dir, "auto")
        assert loaded is not None and loaded.name == f"checkpoint_{SAVED_AT:08d}"
        after_load = _whole_state(*objects)
        _train(*objects, range(SAVED_AT, SAVED_AT + MORE))
        final = _whole_state(*objects)
        if rank == 0:
            torch.save({"saved": after_load, "final": final}, run_dir / "resumed.pt")


@pytest.mark.parametrize("variants, writers, readers", CASES)
def test_zero_checkpoint_resumes_on_another_number_of_ranks(tmp_path, variants, writers, readers):
    run_on_ranks(_write, writers, str(tmp_path), variants, env_init=True, timeout=400)
    run_on_ranks(_resume, readers, str(tmp_path), variants, env_init=True, timeout=400)
    for stage, name in variants:
        _assert_continues(tmp_path / f"zero{stage}_{name}", f"zero{stage} {name}", writers, readers)


def _assert_continues(run_dir, variant, writers, readers):
    writer, resumed = torch.load(run_dir / "writer.pt"), torch.load(run_dir / "resumed.pt")
    saved, loaded = writer["saved"], resumed["saved"]
    assert loaded["lr"] == saved["lr"] and loaded["schedule"] == saved["schedule"] == SAVED_AT
    assert saved["tensors"].keys() == loaded["tensors"].keys() and len(saved["tensors"]) > 100
    states = [k for k in saved["tensors"] if ":" in k]
    assert sum(bool(saved["tensors"][k].abs().sum() > 0) for k in states) > 50  # optimizer state to lose
    for name, value in saved["tensors"].items():
        assert torch.equal(loaded["tensors"][name], value), name
    largest = 0.0
    for name, value in writer["final"]["tensors"].items():
        if ":" in name:
            continue
        got = resumed["final"]["tensors"][name]
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, msg=name)
        largest = max(largest, float((got.double() - value.double()).abs().max()))
    moved = max(float((writer["final"]["tensors"][k] - saved["tensors"][k]).abs().max())
                for k in saved["tensors"] if ":" not in k)
    print(f"{variant} {writers} -> {readers} ranks: max |w_resumed - w_uninterrupted| {largest:.3g} "
          f"after {MORE} steps that moved the weights by up to {moved:.3g}")


def test_a_checkpoint_that_cannot_be_repartitioned_names_the_launch_that_can(tmp_path):
    """No guess and no partial load: the refusal says which --num_processes resumes it as it is."""
    from rsc_dist.trainer import checkpoints

    checkpoint = tmp_path / "checkpoint_00000004"
    (checkpoint / "pytorch_model").mkdir(parents=True)
    for rank in (0, 2):  # rank 1's shard is not there
        torch.save({}, checkpoint / "pytorch_model" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    engine = SimpleNamespace(zero_offload_optimizer=lambda: None, zero_offload_param=lambda: None)
    accelerator = SimpleNamespace(deepspeed_engine_wrapped=SimpleNamespace(engine=engine), num_processes=1,
                                  is_main_process=False, state=SimpleNamespace(deepspeed_plugin=object()))
    ranks = checkpoints._zero_ranks_if_other(checkpoint, accelerator)
    assert ranks == 2
    with checkpoints._zero_shards_repartitioned(accelerator, checkpoint, ranks):
        with pytest.raises(checkpoints.CheckpointError) as refused:
            engine.load_checkpoint(str(checkpoint), "pytorch_model")
    assert str(refused.value) == (
        f"{checkpoint} (ZeRO shards of 2 ranks) cannot be re-partitioned for 1: {checkpoint}/pytorch_model does "
        "not hold one ZeRO optimizer shard per rank 0..N-1; resume it with --num_processes 2 and the "
        "accelerate config that wrote it")
    assert "load_checkpoint" not in vars(engine)  # DeepSpeed's own load is back
