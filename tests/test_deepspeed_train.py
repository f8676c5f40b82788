"""The trainer under DeepSpeed ZeRO-3 on 2 CPU ranks, end to end, as users launch it
(accelerate launch --config_file launch/accelerate/deepspeed_zero3.yaml): evaluation with
partitioned weights, checkpoints/best as consolidated safetensors that rsc_dist.evaluate reads
without DeepSpeed, results.json; a stopped run resumed from DeepSpeed's checkpoint (mid-epoch,
gradient accumulation) ends bit-identical to an uninterrupted one; a damaged ZeRO shard makes
resuming fall back to the previous checkpoint (both in one resume); SIGTERM to the job saves and
the run resumes.

ZeRO-3 because it is the stage that changes the most (the weights themselves are sharded);
ZeRO-1/2 are compared with DDP step by step in test_deepspeed_equivalence.py.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from rsc_dist.core.contracts import PREEMPTED_MARKER
from support.deepspeed import ACCELERATE_CONFIGS, consolidated_weights, launch_with_config
from support.trainer_fixtures import (REPO, WITH_WORKER, explain, launch_command, python_path, sigterm_the_job,
                                      tiny_config)

pytest.importorskip("deepspeed")

pytestmark = pytest.mark.slow
ZERO3 = ACCELERATE_CONFIGS / "deepspeed_zero3.yaml"
# 8 steps of 16 images, 6 steps per epoch; an optimizer step every 2 steps; evaluation and a
# checkpoint every 4 steps (so a stop at step 4 is mid-epoch and on an accumulation boundary).
TRAIN = {"max_steps": 8, "grad_accum": 2, "eval_every_steps": 4, "checkpoint_every_steps": 4}


# python -m rsc_dist.evaluate ARGS in a process where DeepSpeed looks uninstalled: availability
# checks (find_spec) find nothing and an import fails.
WITHOUT_DEEPSPEED = """
import importlib.util, runpy, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] == "deepspeed" else find_spec(name, package))
sys.modules["deepspeed"] = None
sys.argv[0] = "rsc_dist.evaluate"
runpy.run_module("rsc_dist.evaluate", run_name="__main__", alter_sys=True)
"""


def _train(config, run_dir, *extra):
    return launch_with_config(ZERO3, 2, ["--config", str(config), "--output_dir", str(run_dir), *extra])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_shards):
    root = tmp_path_factory.mktemp("zero3")
    config = tiny_config(root, tiny_shards, train=TRAIN)
    result = _train(config, root / "run")
    assert result.returncode == 0, explain(result)
    return config, root / "run"


def test_zero3_on_two_ranks_evaluates_and_saves_a_consolidated_best(uninterrupted, tmp_path):
    config, run = uninterrupted
    results = json.loads((run / "results.json").read_text())
    assert [h["step"] for h in results["history"]] == [4, 8]
    final = run / "checkpoints" / "checkpoint_00000008"
    shards = sorted(p.name for p in (final / "pytorch_model").glob("*optim_states.pt"))
    assert len(shards) == 2 and all("zero_pp_rank_" in name for name in shards), shards  # ZeRO's layout
    assert not (final / "optimizer.bin").exists()  # not Accelerate's DDP layout
    # rsc_dist.evaluate reads best/ without DeepSpeed (an import of it fails in that process)
    # and reproduces the numbers the ZeRO-3 run recorded for it.
    best = run / "checkpoints" / "best"
    out = subprocess.run([sys.executable, "-c", WITHOUT_DEEPSPEED, str(best), "--json", str(tmp_path / "e.json")],
                         capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": python_path(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    evaluation = json.loads((tmp_path / "e.json").read_text())
    assert evaluation["val_acc"] == pytest.approx(results["best"]["val_acc"], abs=1e-9)
    for domain, accuracy in results["best"]["target_acc"].items():
        assert evaluation["per_domain"][domain]["top1"] == pytest.approx(accuracy, abs=1e-9)
    # best/ holds the whole weights, equal to the checkpoint of the step that was best.
    from safetensors.torch import load_file

    saved = load_file(str(best / "model.safetensors"))
    step_weights = consolidated_weights(run / "checkpoints" / f"checkpoint_{results['best']['step']:08d}")
    assert saved.keys() >= step_weights.keys() and len(step_weights) > 50
    for name, value in step_weights.items():
        assert torch.equal(saved[name], value), name


def test_zero3_resume_mid_epoch_past_a_damaged_shard_is_bit_identical(uninterrupted, tmp_path):
    """A run stopped at step 4 (mid-epoch, on an accumulation boundary) finds a newer checkpoint
    whose ZeRO shard was cut short (the uninterrupted run's step 8, planted): resuming falls back
    to the stop's checkpoint and ends bit-identical to the uninterrupted run. One resume proves
    both (a clean resume from a ZeRO-3 checkpoint: the SIGTERM test below)."""
    config, reference = uninterrupted
    run = tmp_path / "run"
    stopped = _train(config, run, "--train.stop_at_step=4")
    assert stopped.returncode != 0 and (run / PREEMPTED_MARKER).exists(), explain(stopped)
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint_*")) == ["checkpoint_00000004"]
    newest = run / "checkpoints" / "checkpoint_00000008"
    shutil.copytree(reference / "checkpoints" / "checkpoint_00000008", newest)
    shard = sorted((newest / "pytorch_model").glob("*zero_pp_rank_1_*optim_states.pt"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a save cut short
    resumed = _train(config, run)
    assert resumed.returncode == 0, explain(resumed)
    assert f"pytorch_model/{shard.name} is truncated" in resumed.stderr, explain(resumed)
    assert "resuming from" in resumed.stderr and "checkpoint_00000004" in resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    _assert_same_end(reference, run)


def _assert_same_end(reference, run):
    final = "checkpoints/checkpoint_00000008"
    expected, got = consolidated_weights(reference / final), consolidated_weights(run / final)
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    before = json.loads((reference / "results.json").read_text())
    after = json.loads((run / "results.json").read_text())
    assert after["last"] == before["last"] and after["best"] == before["best"]


def test_sigterm_to_a_zero3_job_saves_and_resumes(tmp_path, tiny_shards):
    """As SLURM or Kubernetes stop a job: SIGTERM to the launcher's whole process group (torchrun
    forwards it too). The ranks agree, save DeepSpeed's checkpoint, write the marker and exit;
    the run then resumes from that checkpoint."""
    config = tiny_config(tmp_path, tiny_shards, data=WITH_WORKER, train={"epochs": 30, "agree_every_steps": 1})
    run = tmp_path / "run"
    command = launch_command(["--config", str(config), "--output_dir", str(run)], processes=2, config_file=ZERO3)
    _stopped, saved = sigterm_the_job(command, run)
    checkpoint = run / "checkpoints" / f"checkpoint_{saved['step']:08d}"
    assert len(list((checkpoint / "pytorch_model").glob("*zero_pp_rank_*optim_states.pt"))) == 2
    # A shorter run changes the schedule (another trajectory), so the resume is forced.
    resumed = _train(config, run, "--train.max_steps", str(saved["step"] + 2), "--resume", "force")
    assert resumed.returncode == 0, explain(resumed)
    assert f"at step {saved['step']}" in resumed.stdout
