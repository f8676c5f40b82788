"""python -m rsc_dist.evaluate: a saved model evaluated exactly as the trainer evaluated it."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from data_prep.manifest import load_manifest
from rsc_dist import evaluate, train
from rsc_dist.config import load_config, save_config
from rsc_dist.core.contracts import CHECKPOINTS_DIR, RESULTS_FILE
from rsc_dist.trainer import checkpoints
from support.trainer_fixtures import REPO, WITH_WORKER, explain, tiny_config


def _error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_missing_folder_weights_or_config_are_one_line_errors(tmp_path, capsys):
    assert evaluate.main([str(tmp_path / "nowhere")]) == 2
    assert _error(capsys) == f"rsc_dist.evaluate: error: {tmp_path / 'nowhere'}: no such checkpoint folder"

    empty = tmp_path / "run" / CHECKPOINTS_DIR / "checkpoint_00000002"
    empty.mkdir(parents=True)
    assert evaluate.main([str(empty)]) == 2
    assert "has no model.safetensors" in _error(capsys)

    save_file({"w": torch.zeros(1)}, str(empty / checkpoints.MODEL_FILE))
    assert evaluate.main([str(empty)]) == 2
    assert f"no config for {empty}: neither" in _error(capsys)


def test_a_best_left_aside_by_an_interrupted_save_is_found(tmp_path):
    """save_best swaps best/ in with two renames; a crash between them leaves only .old_best/
    (test_checkpoints repairs it at the next save). evaluate reads that one, and only for best/."""
    root = tmp_path / "run" / CHECKPOINTS_DIR
    previous = root / ".old_best"
    previous.mkdir(parents=True)
    (previous / checkpoints.MODEL_FILE).write_bytes(b"")
    (previous / checkpoints.BEST_CONFIG_FILE).write_text("")
    assert evaluate.locate(root / checkpoints.BEST_DIR) == (
        previous / checkpoints.MODEL_FILE, previous / checkpoints.BEST_CONFIG_FILE)
    with pytest.raises(evaluate.EvaluateError, match="no such checkpoint folder"):
        evaluate.locate(root / "checkpoint_00000002")


def test_weights_that_do_not_fit_are_a_one_line_error(tmp_path, tiny_shards, capsys):
    best = tmp_path / checkpoints.BEST_DIR
    best.mkdir()
    save_config(load_config(str(tiny_config(tmp_path, tiny_shards))), best / checkpoints.BEST_CONFIG_FILE)
    from rsc_dist.models.build import build_model

    classes = load_manifest(tiny_shards).num_classes
    weights = build_model("resnet18", classes - 1).state_dict()  # a class fewer than the data
    weights["extra.weight"] = torch.zeros(1)
    del weights["features.0.weight"]
    save_file(weights, str(best / checkpoints.MODEL_FILE))
    code = evaluate.main([str(best)])
    message = _error(capsys)
    assert code == 2, message
    assert message == (f"rsc_dist.evaluate: error: {best / checkpoints.MODEL_FILE} does not fit model.arch=resnet18 "
                       f"with {classes} classes: 1 missing tensor(s) (features.0.weight); 1 unexpected tensor(s) "
                       f"(extra.weight); 2 of another shape (head.fc.bias ({classes - 1},) instead of ({classes},); "
                       f"head.fc.weight ({classes - 1}, 512) instead of ({classes}, 512))")


def test_the_trainers_device_checks_apply(tmp_path, tiny_shards, capsys, monkeypatch):
    """evaluate builds its Accelerator with build.make_accelerator: two ranks started with a GPU
    launch config (bf16, one rank per GPU) on this machine without CUDA stop with the trainer's
    one-line reason before any process group is formed (a rank would otherwise wait for a
    partner that is never started)."""
    if torch.cuda.is_available():
        pytest.skip("the check under test is the one for machines without CUDA")
    best = tmp_path / checkpoints.BEST_DIR
    best.mkdir()
    save_config(load_config(str(tiny_config(tmp_path, tiny_shards))), best / checkpoints.BEST_CONFIG_FILE)
    save_file({"w": torch.zeros(1)}, str(best / checkpoints.MODEL_FILE))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.delenv("RSC_DIST_CPU_RANK", raising=False)
    assert evaluate.main([str(best)]) == 2
    assert _error(capsys).startswith("rsc_dist.evaluate: error: 2 ranks were started with a GPU launch config")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_shards):
    """A tiny run evaluated at steps 2, 4 and 6, a checkpoint at each."""
    tmp_path = tmp_path_factory.mktemp("evaluate")
    config = tiny_config(tmp_path, tiny_shards, data=WITH_WORKER, train={"max_steps": 6, "eval_every_steps": 2,
                                                        "checkpoint_every_steps": 2, "keep_checkpoints": 3})
    run_dir = tmp_path / "run"
    assert train.main(["--config", str(config), "--output_dir", str(run_dir)]) == 0
    return run_dir


def _expected(evaluation: dict) -> dict:
    per_domain = {d: acc for d, acc in evaluation["val_per_domain"].items()}
    per_domain.update(evaluation["target_acc"])
    return per_domain


@pytest.mark.slow
def test_the_best_checkpoint_reproduces_results_json(trained_run, tmp_path, capsys):
    results = json.loads((trained_run / RESULTS_FILE).read_text())
    assert results["best_checkpoint"] == checkpoints.BEST_RELATIVE
    out = tmp_path / "eval.json"
    assert evaluate.main([str(trained_run / results["best_checkpoint"]), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    best = results["best"]
    assert got["step"] == best["step"]
    assert {d: row["top1"] for d, row in got["per_domain"].items()} == _expected(best)  # exactly
    assert got["val_acc"] == best["val_acc"]
    for domain, top5 in best["target_top5"].items():
        assert got["per_domain"][domain]["top5"] == top5 and got["per_domain"][domain]["role"] == "target"
    assert got["per_domain"]["sketch"]["n"] == best["target_n"]["sketch"]
    assert {d: r["n"] for d, r in got["per_domain"].items() if r["role"] == "source (val)"} == best["val_n"]
    assert got["val_acc_mean"] == best["val_acc_mean"]
    table = capsys.readouterr().out
    assert "domain" in table and "top-1" in table and "top-5" in table
    assert "sketch    target" in table


@pytest.mark.slow
def test_every_checkpoint_reproduces_its_evaluation(trained_run, tmp_path):
    history = {h["step"]: h for h in json.loads((trained_run / RESULTS_FILE).read_text())["history"]}
    for step in (2, 4, 6):
        got = evaluate.evaluate_checkpoint(trained_run / CHECKPOINTS_DIR / f"checkpoint_{step:08d}")
        assert got["step"] == step
        assert {d: row["top1"] for d, row in got["per_domain"].items()} == _expected(history[step]), step


@pytest.mark.slow
def test_named_domains_whole_and_another_data_root(trained_run, tmp_path, tiny_shards):
    copy = tmp_path / "moved_shards"
    shutil.copytree(tiny_shards, copy)
    out = tmp_path / "eval.json"
    best = trained_run / checkpoints.BEST_RELATIVE
    assert evaluate.main([str(best), "--domains", "photo", "sketch", "--json", str(out),
                          f"--data.root={copy}"]) == 0
    got = json.loads(out.read_text())["per_domain"]
    manifest = load_manifest(tiny_shards)
    assert list(got) == ["photo", "sketch"]
    assert got["photo"]["n"] == manifest.num_samples("photo") and got["photo"]["role"] == "source (all)"
    assert got["sketch"]["n"] == manifest.num_samples("sketch") and got["sketch"]["role"] == "target (all)"
    # The target domain's whole data is what the run evaluates it on: the same numbers.
    best_sketch = json.loads((trained_run / RESULTS_FILE).read_text())["best"]["target_acc"]["sketch"]
    assert got["sketch"]["top1"] == best_sketch


@pytest.mark.slow
def test_unknown_domain_is_a_one_line_error(trained_run, capsys):
    assert evaluate.main([str(trained_run / checkpoints.BEST_RELATIVE), "--domains", "quickdraw"]) == 2
    assert "--domains ['quickdraw']: not in the data" in _error(capsys)


@pytest.mark.slow
def test_two_processes_count_every_sample_once(trained_run, tmp_path):
    out = tmp_path / "eval2.json"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", str(REPO / "rsc_dist" / "evaluate.py"),
               str(trained_run / checkpoints.BEST_RELATIVE), "--json", str(out)]
    from support.trainer_fixtures import _free_port

    command[command.index("--main_process_port") + 1] = str(_free_port())
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert result.returncode == 0, explain(result)
    assert "starting 2 CPU ranks" in result.stderr
    got = json.loads(out.read_text())["per_domain"]
    single = evaluate.evaluate_checkpoint(trained_run / checkpoints.BEST_RELATIVE)["per_domain"]
    for domain, row in single.items():
        assert got[domain]["n"] == row["n"], domain
        # The same samples through the same weights; only the batch composition differs.
        assert abs(got[domain]["top1"] - row["top1"]) <= 1 / row["n"] + 1e-12, domain
