"""The trainer end to end, launched as users launch it (accelerate launch, subprocesses)."""

import json
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.manifest import load_manifest
from rsc_dist import train
from rsc_dist.core import contracts, selection
from rsc_dist.core.contracts import CHECKPOINTS_DIR, PREEMPTED_MARKER, RESULTS_FILE
from rsc_dist.observe.metrics import TABLE_KEY
from rsc_dist.results import cli as results_cli
from rsc_dist.results import tables as results_module
from rsc_dist.trainer.checkpoints import MODEL_FILE
from rsc_dist.observe.provenance import git_commit
from support.trainer_fixtures import (WITH_WORKER, explain, launch, launch_command, refusing_deepspeed, sigterm_the_job,
                                      tiny_config)
from support.wandb_records import read_table, summarize

pytestmark = pytest.mark.slow


def _final_weights(run_dir: Path) -> dict:
    newest = sorted((run_dir / CHECKPOINTS_DIR).glob("checkpoint_*"))[-1]
    return load_file(newest / MODEL_FILE)


def test_two_ranks_end_to_end_with_offline_wandb(tmp_path, tiny_shards):
    config = tiny_config(tmp_path, tiny_shards, wandb={"mode": "offline"}, data=WITH_WORKER,
                         train={"epochs": 1, "image_log_every_steps": 2, "log_every_steps": 2})
    run_dir = tmp_path / "run"
    result = launch(["--config", str(config), "--output_dir", str(run_dir)], processes=2,
                    env=refusing_deepspeed({"WANDB_API_KEY": "", "WANDB_MODE": ""}))
    assert result.returncode == 0, explain(result)
    assert "starting 2 CPU ranks" in result.stderr
    assert re.search(r"^2 process\(es\) x 1 thread\(s\) on cpu(:\d+)? \(train.cpu_threads\)", result.stdout,
                     flags=re.M), result.stdout
    # Evaluation, best/, checkpoints, W&B and the report never import DeepSpeed (or print its warning).
    assert "deepspeed" not in (result.stdout + result.stderr).lower(), explain(result)

    results = json.loads((run_dir / RESULTS_FILE).read_text())
    manifest = load_manifest(tiny_shards)
    last = results["last"]
    # Every evaluation sample counted exactly once across the 2 ranks.
    sources = ("cartoon", "painting", "photo")
    assert results["history"][-1]["val_n"] == {d: manifest.num_samples(d, "val") for d in sources}
    assert results["history"][-1]["target_n"] == {"sketch": manifest.num_samples("sketch")}
    # The written document is the one contracts.py describes (keys and types), nothing more or less.
    assert contracts.layout_problems(results) == []
    assert results["selection"] == "source_val_pooled" and results["best"] == selection.select(
        results["history"], "source_val_pooled")
    assert set(last["target_acc"]) == {"sketch"} and 0 <= last["target_acc"]["sketch"] <= 1
    assert results["algorithm"] == "rsc" and results["throughput_img_s"] > 0
    provenance = results["provenance"]  # what computed the run
    assert (provenance["world_size"], provenance["local_ranks"], provenance["nodes"]) == (2, 2, 1)
    assert (provenance["threads_per_rank"], provenance["threads_rule"]) == (1, "train.cpu_threads")
    assert provenance["device_type"] == "cpu" and sum(provenance["devices"].values()) == 2
    assert provenance["versions"]["torch"] == torch.__version__.split("+")[0]
    assert provenance["commit"] == git_commit() and provenance["ended"] >= provenance["started"]
    assert [(s["start_step"], s["end_step"], s["world_size"]) for s in provenance["segments"]] == \
        [(0, results["steps"], 2)]

    wandb_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1, "exactly one W&B run (main process only)"
    logged = summarize(wandb_files[0])
    for key in ("train/loss", "train/acc", "train/lr", "train/masked_fraction", "perf/img_s",
                "perf/data_wait_fraction", "val/acc", "target/acc_sketch", "rsc/masks/path"):
        assert key in logged["history_keys"], key
    assert {"rsc", "data", "optim", "algorithm"} <= set(logged["config"])
    assert json.loads(logged["config"]["provenance"])["world_size"] == 2
    assert logged["run"]["name"] == "rsc-sketch-seed0" and logged["run"]["group"] == "demo"
    assert list(wandb_files[0].parent.glob("files/media/images/rsc/masks_*.png"))
    # n on every row of the per-domain table, equal to the manifest's counts.
    table = read_table(wandb_files[0], logged["tables"][TABLE_KEY])
    n = {(row[0], row[1]): row[table["columns"].index("n")] for row in table["data"]}
    total_val = sum(manifest.num_samples(d, "val") for d in sources)
    assert n == {**{(d, "source-val"): manifest.num_samples(d, "val") for d in sources},
                 ("all sources", "source-val (pooled)"): total_val, ("all sources", "source-val (mean)"): total_val,
                 ("sketch", "target"): manifest.num_samples("sketch"),
                 ("mean over targets", "target (mean)"): manifest.num_samples("sketch")}
    assert logged["summary"]["best/selection"] == "source_val_pooled"
    # The W&B run folder holds a link to results.json (files/results.json): still one run.
    assert (wandb_files[0].parent / "files" / RESULTS_FILE).exists()
    assert [run.path for run in results_module.find_runs(tmp_path)] == [run_dir / RESULTS_FILE]
    assert results_cli.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0


@pytest.mark.parametrize("processes, grad_accum", [(1, 1), (2, 1), (1, 2)])
def test_resume_mid_epoch_equals_uninterrupted(tmp_path, tiny_shards, processes, grad_accum):
    config = tiny_config(tmp_path, tiny_shards, train={"epochs": 2, "agree_every_steps": 2,
                                                        "grad_accum": grad_accum})
    common = ["--config", str(config)]
    stop = 4 if grad_accum == 2 else 5
    whole = launch(common + ["--output_dir", str(tmp_path / "whole")], processes=processes)
    assert whole.returncode == 0, explain(whole)

    cut = tmp_path / "cut"
    first = launch(common + ["--output_dir", str(cut), f"--train.stop_at_step={stop}"], processes=processes)
    assert first.returncode != 0 and (cut / PREEMPTED_MARKER).exists(), explain(first)
    assert json.loads((cut / PREEMPTED_MARKER).read_text())["step"] == stop
    assert [p.name for p in (cut / CHECKPOINTS_DIR).iterdir()] == [f"checkpoint_{stop:08d}"]
    second = launch(common + ["--output_dir", str(cut), "--resume", "auto"], processes=processes)
    assert second.returncode == 0, explain(second)
    assert "resumed from" in second.stdout and not (cut / PREEMPTED_MARKER).exists()

    expected, got = _final_weights(tmp_path / "whole"), _final_weights(cut)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    history = lambda d: [(h["step"], h["val_acc"], h["target_acc"]) for h in
                         json.loads((d / RESULTS_FILE).read_text())["history"]]
    assert history(cut) == history(tmp_path / "whole")


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path, tiny_shards):
    config = tiny_config(tmp_path, tiny_shards, data=WITH_WORKER, train={"epochs": 30, "agree_every_steps": 1})
    run_dir = tmp_path / "run"
    stopped, saved = sigterm_the_job(launch_command(["--config", str(config), "--output_dir", str(run_dir)],
                                                    processes=2), run_dir)
    # As README says: the launcher itself dies of the signal (a shell shows 143), not 75 or 1;
    # the marker is what tells a script to rerun.
    assert stopped.returncode == -signal.SIGTERM, explain(stopped)
    step = saved["step"]
    assert (run_dir / CHECKPOINTS_DIR / f"checkpoint_{step:08d}").is_dir()
    # A shorter run changes the schedule: a different trajectory, so the resume must be forced.
    resumed = launch(["--config", str(config), "--output_dir", str(run_dir), "--train.max_steps",
                      str(step + 2), "--resume", "force"], processes=2)
    assert resumed.returncode == 0, explain(resumed)
    assert f"at step {step}" in resumed.stdout


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_shards, capsys):
    config = tiny_config(tmp_path, tiny_shards, optim={"lr": 1.0e30},
                         train={"checkpoint_every_steps": 1, "agree_every_steps": 1, "max_steps": 6})
    code = train.main(["--config", str(config), "--output_dir", str(tmp_path / "run")])
    assert code == 3
    assert "non-finite loss" in capsys.readouterr().out
    kept = [p.name for p in (tmp_path / "run" / CHECKPOINTS_DIR).iterdir()]
    assert kept and all(int(name.split("_")[1]) < 6 for name in kept)
    weights = _final_weights(tmp_path / "run")
    assert all(torch.isfinite(w).all() for w in weights.values())


def _broken_copy(tmp_path, shards, what):
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    if what == "missing_shard":
        next(copy.glob("photo/train-*.tar")).unlink()
    if what == "no_manifest":
        (copy / "_info.json").unlink()
    return copy


@pytest.mark.parametrize("what, overrides, message", [
    ("missing_shard", [], "shard(s) listed in"),
    ("no_manifest", [], "_info.json"),
    (None, ["--data.target=quickdraw"], "domains ['quickdraw'] (data.target/data.sources) are not in"),
    (None, ["--data.sources=photo", "--data.target=photo"], "overlaps"),
    (None, ["--data.batch_size=100000"], "cannot fill one global batch"),
    (None, ["--rsc.strategy=best"], "rsc.strategy must be one of"),
    (None, ["--data.classes=[dog,cat]"], "does not match the classes of"),
    (None, ["--train.grad_accum=2", "--train.agree_every_steps=3"], "must be a multiple of train.grad_accum"),
    (None, ["--model.sync_bn=true", "--train.max_steps=1"], None),
    (None, ["--resume", "/nonexistent/ckpt"], "no such checkpoint folder"),
])
def test_config_and_data_errors(tmp_path, tiny_shards, capsys, what, overrides, message):
    shards = _broken_copy(tmp_path, tiny_shards, what) if what else tiny_shards
    config = tiny_config(tmp_path, shards)
    code = train.main(["--config", str(config), "--output_dir", str(tmp_path / "run"), *overrides])
    if message is None:  # sync_bn with one process: nothing to synchronize, runs normally
        assert code == 0
        return
    assert code == 2
    assert message in capsys.readouterr().err


def test_erm_and_pretrained_missing_is_clear(tmp_path, tiny_shards, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    config = tiny_config(tmp_path, tiny_shards)
    code = train.main(["--config", str(config), "--output_dir", str(tmp_path / "run"),
                       "--model.pretrained=torchvision"])
    assert code == 2
    err = capsys.readouterr().err
    assert "pretrained weights for resnet18 not found" in err and "never downloads" in err


def test_last_step_is_evaluated_and_saved_off_cadence(tmp_path, tiny_shards):
    config = tiny_config(tmp_path, tiny_shards, train={"max_steps": 5, "eval_every_steps": 3,
                                                        "checkpoint_every_steps": 3})
    assert train.main(["--config", str(config), "--output_dir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert [h["step"] for h in results["history"]] == [3, 5] and results["last"]["step"] == 5
    assert (tmp_path / "run" / CHECKPOINTS_DIR / "checkpoint_00000005").is_dir()


def test_a_stop_requested_at_the_last_step_finishes_the_run(tmp_path, tiny_shards):
    config = tiny_config(tmp_path, tiny_shards, train={"max_steps": 2, "stop_at_step": 2, "log_every_steps": 10})
    assert train.main(["--config", str(config), "--output_dir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert results["last"]["step"] == 2
    assert not (tmp_path / "run" / PREEMPTED_MARKER).exists()
    # A run shorter than train.log_every_steps still reports its training throughput.
    assert results["throughput_img_s"] > 0


def test_rerunning_a_finished_run_keeps_its_results(tmp_path, tiny_shards, capsys):
    config = tiny_config(tmp_path, tiny_shards, train={"max_steps": 2})
    args = ["--config", str(config), "--output_dir", str(tmp_path / "run")]
    assert train.main(args) == 0
    before = (tmp_path / "run" / RESULTS_FILE).read_text()
    assert train.main(args) == 0
    assert "already complete at step 2" in capsys.readouterr().out
    assert (tmp_path / "run" / RESULTS_FILE).read_text() == before


def test_decoding_on_the_device_trains_to_the_same_weights(tmp_path, tiny_shards):
    """data.decode=device (here the CPU is the device) computes the same pixels as the workers,
    so the whole run ends with the same weights."""
    config = tiny_config(tmp_path, tiny_shards, train={"max_steps": 3})
    for decode in ("workers", "device"):
        code = train.main(["--config", str(config), "--output_dir", str(tmp_path / decode), f"--data.decode={decode}"])
        assert code == 0
    workers, device = _final_weights(tmp_path / "workers"), _final_weights(tmp_path / "device")
    assert all(torch.equal(workers[k], device[k]) for k in workers)


def test_a_source_without_validation_data_is_refused_unless_selection_needs_none(tmp_path, tiny_shards, capsys):
    """Planted defect: a source domain with 0 val samples was accepted, and the FIRST evaluation
    was reported as best. A rule that ranks by source validation now refuses at start."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    info = json.loads((shards / "_info.json").read_text())
    info["splits"]["painting"]["val"] = {"num_samples": 0, "shards": []}
    (shards / "_info.json").write_text(json.dumps(info))
    config = tiny_config(tmp_path, shards, train={"max_steps": 4, "eval_every_steps": 2})
    run = ["--config", str(config), "--output_dir", str(tmp_path / "run")]
    for rule in ("source_val_pooled", "source_val_mean"):
        assert train.main(run + [f"--train.selection={rule}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"train.selection={rule}" in err[0] and "painting" in err[0]
        assert "cartoon" not in err[0] and "--train.selection=last" in err[0]
    assert not (tmp_path / "run" / CHECKPOINTS_DIR).exists()
    assert train.main(run + ["--train.selection=last"]) == 0
    results = json.loads((tmp_path / "run" / RESULTS_FILE).read_text())
    assert [e["step"] for e in results["history"]] == [2, 4] and results["best"]["step"] == 4
    assert results["selection"] == "last" and results["history"][0]["val_n"]["painting"] == 0
    assert results["history"][0]["val_acc_mean"] is None and results["history"][0]["val_acc"] is not None
