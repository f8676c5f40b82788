"""Elastic resume: a checkpoint written by W ranks continues on W' ranks with the exact global
sequence. With frozen BatchNorm statistics and the same global batch, 2 ranks to step k then
1 process to step 2k (and 1 -> 2; and under DeepSpeed ZeRO-2, 2 -> 1) end with the weights of
an uninterrupted 1-process run, and every step along the way masks the same number of samples
with nearly the same loss (the per-step metrics, all ranks reduced, read back from the
TensorBoard events)."""

import pytest
import torch
from safetensors.torch import load_file

from support.trainer_fixtures import explain, launch, tiny_config

pytestmark = pytest.mark.slow
K = 3


def _per_step(run_dir, key):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars(key)}


def _weights(run_dir):
    newest = sorted((run_dir / "checkpoints").glob("checkpoint_*"))[-1]
    return load_file(newest / "model.safetensors")


@pytest.fixture(scope="module")
def elastic_config(tmp_path_factory, tiny_shards):
    tmp = tmp_path_factory.mktemp("elastic")
    config = tiny_config(tmp, tiny_shards, model={"freeze_bn": True},
                         data={"global_batch_size": 16, "batch_size": 999},
                         optim={"lr": 0.002}, rsc={"p_batch": 0.5},
                         train={"max_steps": 2 * K, "checkpoint_every_steps": K, "agree_every_steps": 1,
                                "eval_every_steps": 2 * K, "tracker": "tensorboard", "log_every_steps": 1})
    whole = tmp / "whole"
    result = launch(["--config", str(config), "--output_dir", str(whole)], processes=1)
    assert result.returncode == 0, explain(result)
    return config, _weights(whole), whole


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_continues_the_same_run(tmp_path, elastic_config, first, second):
    config, expected, whole = elastic_config
    run_dir = tmp_path / "run"
    args = ["--config", str(config), "--output_dir", str(run_dir)]
    cut = launch(args + [f"--train.stop_at_step={K}"], processes=first)
    assert cut.returncode != 0 and (run_dir / "preempted.json").exists(), explain(cut)
    resumed = launch(args, processes=second)
    assert resumed.returncode == 0, explain(resumed)
    assert "resumed from" in resumed.stdout and f"{second} process(es)" in resumed.stdout
    _assert_continues(run_dir, _weights(run_dir), expected, whole)


def test_a_deepspeed_run_resumes_on_another_number_of_ranks(tmp_path, elastic_config):
    """ZeRO-2 on 2 ranks to step k, then 1 rank to 2k, its ZeRO shards re-partitioned on load
    (rsc_dist.zero_elastic): the weights, masks and losses of the uninterrupted 1-process run."""
    pytest.importorskip("deepspeed")
    from support.deepspeed import ACCELERATE_CONFIGS, consolidated_weights, launch_with_config

    config, expected, whole = elastic_config
    run_dir = tmp_path / "run"
    args = ["--config", str(config), "--output_dir", str(run_dir)]
    zero2 = ACCELERATE_CONFIGS / "deepspeed_zero2.yaml"
    cut = launch_with_config(zero2, 2, args + [f"--train.stop_at_step={K}"])
    assert cut.returncode != 0 and (run_dir / "preempted.json").exists(), explain(cut)
    resumed = launch_with_config(zero2, 1, args)
    assert resumed.returncode == 0, explain(resumed)
    assert f"resumed from {run_dir / 'checkpoints' / f'checkpoint_{K:08d}'}" in resumed.stdout, explain(resumed)
    assert "written by 2 rank(s): re-partitioning its ZeRO weights and optimizer state for 1" in resumed.stderr
    newest = sorted((run_dir / "checkpoints").glob("checkpoint_*"))[-1]
    _assert_continues(run_dir, consolidated_weights(newest), expected, whole)


def _assert_continues(run_dir, got, expected, whole):
    """The weights of the uninterrupted run ``whole`` and, step by step, its masked fraction and loss."""
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    masked, masked_whole = _per_step(run_dir, "train/masked_fraction"), _per_step(whole, "train/masked_fraction")
    assert sorted(masked) == sorted(masked_whole) == list(range(1, 2 * K + 1))
    assert masked == masked_whole and any(masked.values())
    loss, loss_whole = _per_step(run_dir, "train/loss"), _per_step(whole, "train/loss")
    assert all(abs(loss[s] - loss_whole[s]) <= 1e-4 * abs(loss_whole[s]) for s in loss_whole)


def test_a_changed_global_batch_is_refused_with_the_way_out(tmp_path, tiny_shards):
    """Per-process batch sizes change the global batch with the number of ranks: refused, and the
    message says which data.global_batch_size continues the run."""
    config = tiny_config(tmp_path, tiny_shards, train={"max_steps": 4, "checkpoint_every_steps": 2})
    run_dir = tmp_path / "run"
    args = ["--config", str(config), "--output_dir", str(run_dir)]
    cut = launch(args + ["--train.stop_at_step=2"], processes=2)
    assert (run_dir / "preempted.json").exists(), explain(cut)
    again = launch(args, processes=1)
    assert again.returncode != 0, explain(again)  # the trainer's 2; accelerate launch reports 1
    assert "data order global_batch: 16 -> 8" in again.stderr and "--data.global_batch_size=16" in again.stderr
    fixed = launch(args + ["--data.global_batch_size=16"], processes=1)
    assert fixed.returncode == 0 and "resumed from" in fixed.stdout, explain(fixed)
