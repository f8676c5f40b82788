"""A tiny training in-process, then what W&B (offline) and TensorBoard hold for it."""

import json

import pytest

from rsc_dist import train
from rsc_dist.observe.metrics import TABLE_KEY
from support.trainer_fixtures import tiny_config
from support.wandb_records import read_table, summarize

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_tiny_run_logs_definitions_table_tags_and_best_to_offline_wandb(tmp_path, tiny_shards):
    config = tiny_config(tmp_path, tiny_shards, wandb={"mode": "offline", "tags": ["smoke"]},
                         train={"max_steps": 4, "eval_every_steps": 2, "image_log_every_steps": 2,
                                "log_every_steps": 2})
    run_dir = tmp_path / "run"
    assert train.main(["--config", str(config), "--output_dir", str(run_dir)]) == 0
    results = json.loads((run_dir / "results.json").read_text())
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    logged = summarize(run_file)

    assert logged["metrics"]["val/*"]["step_metric"] == "trainer/step"
    assert logged["metrics"]["train/loss"]["summary"] == {"min", "last"}
    for key in ("trainer/step", "train/loss", "target/acc", "target/acc_sketch", "best/target_acc",
                "best/val_acc", "rsc/masks/path"):
        assert key in logged["history_keys"], key
    best = results["best"]
    assert logged["summary"]["best/target_acc"] == pytest.approx(
        sum(best["target_acc"].values()) / len(best["target_acc"]))
    assert logged["run"]["tags"][0] == "smoke"
    assert {"target:sketch", "resnet18", "rsc", results["dataset"]} <= set(logged["run"]["tags"])
    config_values = {k: json.loads(v) for k, v in logged["config"].items()}
    assert "git_commit" in config_values and config_values["fingerprint"] == results.get("fingerprint")

    table = read_table(run_file, logged["tables"][TABLE_KEY])
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert rows["sketch"]["role"] == "target"
    assert rows["sketch"]["last_top1"] == pytest.approx(results["last"]["target_acc"]["sketch"])
    assert "results.json" in logged["files"]


def test_tiny_run_with_tensorboard(tmp_path, tiny_shards):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(tmp_path, tiny_shards, train={"max_steps": 4, "eval_every_steps": 2,
                                                        "image_log_every_steps": 2, "log_every_steps": 2})
    run_dir = tmp_path / "run"
    code = train.main(["--config", str(config), "--output_dir", str(run_dir), "--train.tracker=tensorboard"])
    assert code == 0
    assert not (run_dir / "wandb").exists()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    for key in ("train/loss", "perf/img_s", "target/acc", "target/acc_sketch", "best/target_acc", "val/acc"):
        assert key in tags["scalars"], key
    assert [e.step for e in events.Scalars("target/acc")][:2] == [2, 4]
    assert "rsc/masks" in tags["images"]
