"""rsc_dist.observe's modules on their own: a real Accelerator(cpu=True), W&B offline or
TensorBoard, and a small fake plan; the run file / event file is read back."""

import json
import subprocess
import types
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from rsc_dist import config as config_module
from rsc_dist.config import load_config
from rsc_dist.core import contracts
from rsc_dist.observe.identity import remember_run_id, run_tags, tracker_name, wandb_run_id
from rsc_dist.observe.masks import mask_caption
from rsc_dist.observe.metrics import TABLE_COLUMNS, TABLE_KEY, evaluation_metrics, per_domain_rows
from rsc_dist.observe import provenance
from rsc_dist.observe.provenance import REPO_ROOT, git_commit
from rsc_dist.observe.report import results_document
from rsc_dist.observe.tracking import Tracking, start_tracking
from support.wandb_records import read_table, summarize

CLASSES = ("dog", "elephant", "giraffe")


def fake_plan(targets=("sketch",)):
    return types.SimpleNamespace(
        manifest=types.SimpleNamespace(classes=CLASSES, dataset="demo", num_classes=len(CLASSES)),
        sources=("cartoon", "photo"), targets=targets, steps_per_epoch=4, total_steps=8,
        global_batch=16, global_forward_batch=16, world_size=1, holdout=None)


def fake_provenance(world_size=1):
    """A run's provenance on ``world_size`` CPU ranks of one host, started once."""
    ranks = [{"host": "node0", "device": "cpu: Test CPU", "device_type": "cpu", "threads": 2,
              "local_ranks": world_size}] * world_size
    return provenance.provenance_record(ranks, [provenance.new_segment(0, ranks)], "train.cpu_threads",
                                        provenance.now())


def make_config(monkeypatch, tracker="wandb", log_model="off", overrides=()):
    """The demo config with W&B offline and the given tracker and log_model."""
    return load_config("demo", ["--wandb.mode=offline", "--wandb.tags=[mine]", f"--train.tracker={tracker}",
                                f"--wandb.log_model={log_model}", *overrides])


@pytest.fixture(autouse=True)
def offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb_data"))


def evaluation(step, val, sketch, top5=0.9, photo=None):
    """An evaluation record (contracts.EVALUATION_RECORD): 30 cartoon + 10 photo val samples."""
    per_domain = {"cartoon": val, "photo": photo or val}
    return {"step": step, "val_acc": (30 * val + 10 * (photo or val)) / 40,
            "val_acc_mean": (val + (photo or val)) / 2, "val_per_domain": per_domain,
            "val_n": {"cartoon": 30, "photo": 10},
            "target_acc": {"sketch": sketch}, "target_top5": {"sketch": top5}, "target_n": {"sketch": 24},
            "target_out_acc": {}, "target_out_n": {},
            "val_loss": 1.0 - val, "val_loss_mean": 1.0 - val, "val_loss_per_domain": {d: 1.0 - v for d, v in per_domain.items()}}


def images_and_mask():
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    mask = torch.ones(4, 8, 4, 4)
    mask[0, :, :2] = 0  # samples 0 and 2 are selected (their masks mute something)
    mask[2, 3] = 0
    return images, mask, torch.tensor([0, 1, 2, 0])


def simulate_run(monkeypatch, tmp_path, tracker="wandb", log_model="off", best_weights=True):
    """What the training loop does, in order; returns (run_dir, results)."""
    config = make_config(monkeypatch, tracker, log_model)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    accelerator = Accelerator(cpu=True, log_with=tracker_name(config), project_dir=str(run_dir))
    plan = fake_plan()
    tracking = start_tracking(accelerator, config, run_dir, plan)
    tracking.log({"train/loss": 2.0, "train/acc": 0.25, "perf/img_s": 100.0}, 2)
    images, mask, labels = images_and_mask()
    tracking.log_masks(images, mask, "spatial", 2, labels=labels, class_names=CLASSES)
    first, second = evaluation(4, 0.6, 0.5), evaluation(8, 0.55, 0.7)
    tracking.log({"train/loss": 1.5, "train/acc": 0.5}, 4)
    tracking.log_evaluation(first, 4, best=first)
    tracking.log({"train/loss": 1.0, "train/acc": 0.75}, 8)
    tracking.log_evaluation(second, 8, best=first)  # worse validation: the best stays at step 4
    if best_weights:
        from safetensors.torch import save_file

        best = run_dir / "checkpoints" / "best"
        best.mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, str(best / "model.safetensors"))
        (best / "optimizer.bin").write_bytes(b"not a model")
    state = types.SimpleNamespace(best=first, last=second, step=8, history=[first, second], forced_resumes=[])
    results = results_document(config, plan, state, types.SimpleNamespace(throughput=12.5), run_dir,
                               provenance=fake_provenance())
    (run_dir / "results.json").write_text(json.dumps(results))
    tracking.finish_run(results, run_dir)
    accelerator.end_training()
    return run_dir, results


def run_file(run_dir: Path) -> Path:
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return path


def test_wandb_run_has_metric_definitions_tags_tables_files_and_identity(monkeypatch, tmp_path):
    run_dir, results = simulate_run(monkeypatch, tmp_path)
    path = run_file(run_dir)
    logged = summarize(path)

    # Every metric against trainer/step; summaries that mean something.
    metrics = logged["metrics"]
    assert "trainer/step" in metrics
    assert metrics["trainer/epoch"]["step_metric"] == "trainer/step"
    for name in ("train/*", "val/*", "target/*", "best/*", "perf/*", "rsc/*", "train/loss"):
        assert metrics[name]["step_metric"] == "trainer/step", name
    assert metrics["train/loss"]["summary"] == {"min", "last"}
    assert metrics["train/acc"]["summary"] == {"max", "last"}
    assert metrics["val/*"]["summary"] == {"max", "last"} == metrics["target/*"]["summary"]
    assert metrics["best/*"]["summary"] == {"last"}

    history = logged["history"]
    assert set(history["trainer/step"]) == {2, 4, 8}
    assert history["target/acc"] == [0.5, 0.7]  # the mean over targets (one target here)
    assert history["best/target_acc"] == [0.5, 0.5] and history["best/val_acc"] == [0.6, 0.6]
    # What a W&B sweep ranks runs by: the chosen evaluation's source validation (demo: pooled).
    assert history["best/selection_score"] == [0.6, 0.6]
    assert history["target/acc_sketch"] == [0.5, 0.7] and history["val/acc_photo"] == [0.6, 0.55]
    assert "trainer/epoch" in logged["history_keys"] and 2.0 in history["trainer/epoch"]
    assert "rsc/masks/path" in logged["history_keys"]
    caption = history["rsc/masks/caption"][0]
    assert caption.splitlines() == ["step 2, spatial mask (red = muted); columns left to right:",
                                    "1: dog selected", "2: elephant not selected", "3: giraffe selected",
                                    "4: dog not selected"]
    assert history["rsc/grid_selected_fraction"] == [0.5]

    # Identity: name, group, job type as before; tags; git commit and fingerprint in the config.
    run = logged["run"]
    assert run["name"] == "rsc-sketch-seed0" and run["group"] == "demo" and run["job_type"] == "rsc"
    assert run["tags"] == ["mine", "demo", "target:sketch", "resnet18", "rsc"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    expected_commit = head.stdout.strip() if head.returncode == 0 else None
    config = {k: json.loads(v) for k, v in logged["config"].items()}
    assert config["git_commit"] == expected_commit
    assert config["fingerprint"] == results["fingerprint"]
    assert config["derived"]["global_batch"] == 16 and config["derived"]["targets"] == ["sketch"]
    assert (run_dir / "wandb" / "run_id").read_text().strip() == run["id"]

    # The per-domain table, logged at the last step, offline too.
    table = read_table(path, logged["tables"][TABLE_KEY])
    assert table["columns"] == TABLE_COLUMNS
    rows = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert rows["sketch"] == {"domain": "sketch", "role": "target", "n": 24, "best_top1": 0.5, "best_top5": 0.9,
                              "last_top1": 0.7, "last_top5": 0.9, "best_step": 4, "last_step": 8}
    assert rows["photo"]["role"] == "source-val" and rows["photo"]["best_top1"] == 0.6
    assert rows["all sources"]["n"] == 40 and rows["mean over targets"]["last_top1"] == 0.7

    # Summary: domain-independent keys; results.json as a run file; no model artifact by default.
    summary = logged["summary"]
    assert summary["best/target_acc"] == 0.5 and summary["best/val_acc"] == 0.6
    assert summary["last/target_acc"] == 0.7 and summary["best/target_acc_sketch"] == 0.5
    assert "results.json" in logged["files"]
    assert json.loads((path.parent / "files" / "results.json").read_text())["fingerprint"] == results["fingerprint"]
    assert [a for a in logged["artifacts"] if a["type"] == "model"] == []


def test_best_model_artifact_with_log_model_best(monkeypatch, tmp_path):
    run_dir, results = simulate_run(monkeypatch, tmp_path, log_model="best")
    assert results["best_checkpoint"] == "checkpoints/best"
    (artifact,) = [a for a in summarize(run_file(run_dir))["artifacts"] if a["type"] == "model"]
    assert artifact["type"] == "model" and artifact["name"].startswith("model-")
    assert artifact["files"] == ["model.safetensors"]  # weights only, not the optimizer state
    assert artifact["metadata"]["step"] == 4 and artifact["metadata"]["target_acc"] == {"sketch": 0.5}
    assert artifact["metadata"]["val_acc"] == 0.6
    assert set(artifact["aliases"]) >= {"best", "step-4"}


def test_log_model_best_without_weights_says_so(monkeypatch, tmp_path, capsys):
    run_dir, results = simulate_run(monkeypatch, tmp_path, log_model="best", best_weights=False)
    assert results["best_checkpoint"] is None
    assert not [a for a in summarize(run_file(run_dir))["artifacts"] if a["type"] == "model"]
    assert "no model artifact logged" in capsys.readouterr().out


def test_configured_mode_wins_over_an_earlier_wandb_session(monkeypatch, tmp_path):
    """Planted defect: the mode reached W&B only through WANDB_MODE, which W&B ignores once a
    session is set up in the process (here one that would go online, with no API key)."""
    import wandb

    monkeypatch.delenv("WANDB_MODE")
    wandb.setup()
    run_dir, _ = simulate_run(monkeypatch, tmp_path)  # wandb.mode=offline in the config
    assert summarize(run_file(run_dir))["summary"]["best/target_acc"] == 0.5


def test_tensorboard_gets_the_same_scalars_and_the_mask_images(monkeypatch, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = simulate_run(monkeypatch, tmp_path, tracker="tensorboard")
    assert not (run_dir / "wandb").exists()
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    for key in ("train/loss", "perf/img_s", "val/acc", "target/acc", "target/acc_sketch", "best/target_acc",
                "best/val_acc", "rsc/grid_selected_fraction"):
        assert key in tags["scalars"], key
    assert [(e.step, e.value) for e in events.Scalars("best/target_acc")][:2] == [(4, 0.5), (8, 0.5)]
    assert [e.value for e in events.Scalars("train/loss")] == [2.0, 1.5, 1.0]
    assert "rsc/masks" in tags["images"]
    image = events.Images("rsc/masks")[0]
    assert image.step == 2 and image.width == 4 * 16 + 5 * 2
    texts = {t for t in tags["tensors"]}
    assert any(t.startswith("rsc/masks_caption") for t in texts) and any(t.startswith(TABLE_KEY) for t in texts)


def test_tracker_none_logs_nothing_but_the_console(monkeypatch, tmp_path, capsys):
    run_dir, results = simulate_run(monkeypatch, tmp_path, tracker="none")
    assert not (run_dir / "wandb").exists() and not (run_dir / "tensorboard").exists()
    assert "step 8: val/acc 0.5500" in capsys.readouterr().out
    assert results["schema_version"] == contracts.RESULTS_SCHEMA_VERSION


def test_tracker_name(monkeypatch):
    assert tracker_name(make_config(monkeypatch, "wandb")) == "wandb"
    config = load_config("demo", ["--wandb.mode=disabled"])
    assert tracker_name(config) is None
    assert tracker_name(make_config(monkeypatch, "tensorboard")) == "tensorboard"
    assert tracker_name(make_config(monkeypatch, "none")) is None


def test_mismatched_accelerator_is_a_clear_error(monkeypatch, tmp_path):
    config = make_config(monkeypatch, "wandb")
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"log_with=rsc_dist\.observe\.identity\.tracker_name"):
        start_tracking(accelerator, config, tmp_path, fake_plan())


def test_results_document_follows_the_contract(monkeypatch, tmp_path):
    config = make_config(monkeypatch)
    first = evaluation(4, 0.6, 0.5)
    state = types.SimpleNamespace(best=first, last=first, step=4, history=[first], forced_resumes=[])
    doc = results_document(config, fake_plan(), state, types.SimpleNamespace(throughput=1.0),
                           provenance=fake_provenance())
    assert doc["schema_version"] == contracts.RESULTS_SCHEMA_VERSION == 4 and doc["best_checkpoint"] is None
    assert (doc["protocol"], doc["holdout"], doc["world_size"], doc["global_batch"]) == ("custom", None, 1, 16)
    assert doc["fingerprint"] == config_module.trajectory_fingerprint(config, 1)
    assert doc["selection"] == "source_val_pooled" and doc["best"]["val_n"] == {"cartoon": 30, "photo": 10}
    assert contracts.layout_problems(json.loads(json.dumps(doc))) == []
    # Nothing chosen (a rule that could score no evaluation): best is null, still the layout.
    state.best = {}
    assert results_document(config, fake_plan(), state, types.SimpleNamespace(throughput=1.0),
                           provenance=fake_provenance())["best"] is None


def test_per_domain_table_has_n_on_every_row():
    """Planted defect: the source rows read a count evaluation never wrote (n always empty)."""
    record = evaluation(4, 0.6, 0.5)
    results = {"sources": ["cartoon", "photo"], "targets": ["sketch"], "best": record, "last": record}
    rows = {(row[0], row[1]): row[2] for row in per_domain_rows(results)}
    assert rows == {("cartoon", "source-val"): 30, ("photo", "source-val"): 10,
                    ("all sources", "source-val (pooled)"): 40, ("all sources", "source-val (mean)"): 40,
                    ("sketch", "target"): 24, ("mean over targets", "target (mean)"): 24}


def test_best_without_the_loop_passing_it_follows_validation(monkeypatch):
    accelerator = types.SimpleNamespace(is_main_process=True, print=lambda *a: None, log=lambda v, step: None)
    tracking = Tracking(accelerator, None)
    seen = []
    tracking.log = lambda values, step: seen.append(values)
    tracking.kind = None
    for e in (evaluation(1, 0.5, 0.3), evaluation(2, 0.7, 0.4), evaluation(3, 0.6, 0.9)):
        tracking.log_evaluation(e, e["step"])
    assert [v["best/target_acc"] for v in seen] == [0.3, 0.4, 0.4]
    assert [v["target/acc"] for v in seen] == [0.3, 0.4, 0.9]


def test_several_targets_have_a_mean(monkeypatch):
    e = {"step": 1, "val_acc": 0.5, "val_per_domain": {}, "target_acc": {"a": 0.2, "b": 0.6},
         "target_top5": {"a": 0.5, "b": 0.7}}
    values = evaluation_metrics(e, e)
    assert values["target/acc"] == pytest.approx(0.4) and values["target/top5"] == pytest.approx(0.6)
    assert values["best/target_acc"] == pytest.approx(0.4) and values["best/target_acc_b"] == 0.6
    tags = run_tags(make_config(monkeypatch), fake_plan(("a", "b")))
    assert tags == ["mine", "demo", "target:a", "target:b", "resnet18", "rsc"]


def test_git_commit_never_fails(tmp_path):
    assert git_commit(tmp_path) is None  # not a repository
    commit = git_commit()
    assert commit is None or len(commit) == 40


def test_run_id_precedence(monkeypatch, tmp_path):
    hashed = wandb_run_id(tmp_path)
    assert len(hashed) == 16
    remember_run_id(tmp_path, "sweeprun1")
    assert wandb_run_id(tmp_path) == "sweeprun1"  # a sweep trial resumed outside the agent
    monkeypatch.setenv("WANDB_RUN_ID", "agentrun2")
    assert wandb_run_id(tmp_path) == "agentrun2"  # the agent's id wins


def test_mask_caption_without_labels():
    text = mask_caption(5, "channel", None, (), [True, False])
    assert text.splitlines()[1:] == ["1: ? selected", "2: ? not selected"]


@pytest.mark.parametrize("env, key, expected", [
    ("Offline", "", "offline"), ("DISABLED", "x" * 40, "disabled"), ("dryrun", "x" * 40, "offline"),
    ("", "x" * 40, "online"), ("", "", "offline"), ("bogus", "", "offline")])
def test_trainer_and_results_read_wandb_mode_from_the_environment_alike(monkeypatch, tmp_path, env, key, expected):
    """wandb.mode=auto in the trainer and `python -m rsc_dist.results --wandb` share one reading
    of WANDB_MODE and the API key (results.log_to_wandb calls the same function)."""
    from rsc_dist.observe.identity import wandb_mode, wandb_mode_from_environment

    monkeypatch.setenv("WANDB_MODE", env)
    monkeypatch.setenv("WANDB_API_KEY", key)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert wandb_mode_from_environment() == expected
    assert wandb_mode(load_config("demo", ["--wandb.mode=auto"])) == expected
