"""Weight averaging through whole runs of rsc_dist.train on tiny shards (one shared set of runs):

- SWAD (a window small enough for 4 evaluations) uninterrupted, stopped at step 2 and resumed
  (bit-identical average and records), stopped on 2 DDP ranks and resumed on 1, and stopped on
  2 ZeRO-2 ranks and resumed on 1 (each rank averaged its own partition; the checkpoint holds
  the whole average, which loads on any number of ranks): the same averaged weights up to float
  rounding; checkpoints/best_averaged/ evaluates with rsc_dist.evaluate (no DeepSpeed needed)
  to the numbers results.json reports;
- EMA with BatchNorm training (its statistics recomputed before every evaluation);
- rsc_dist.results prints the averaged models as rows of their own;
- a ResNet-18 run started from another run's folder with other classes (the head starts anew);
  a DeepSpeed checkpoint folder as model.pretrained;
- a small sweep started from one shared checkpoint, averaged into a uniform and a greedy soup
  (recomputed here from the ingredients' weights and scores), and runs that do not share an
  initialization refused.
"""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from rsc_dist import evaluate, soup, train
from rsc_dist.averaging.rules import ema_decay
from rsc_dist.results import cli as results
from rsc_dist.sweep.spec import load_sweep
from rsc_dist.sweep.state import RECORD_FILE, write_record
from support.deepspeed import ACCELERATE_CONFIGS, consolidated_weights
from support.dist_utils import free_port, run_on_ranks
from support.method_suite import end_to_end_config, relative_l2, run_trainer_jobs

pytestmark = pytest.mark.slow

CUT, STEPS = 2, 4
SWAD = ["--train.averaging=swad", "--averaging.swad_n_converge=2", "--averaging.swad_n_tolerance=3"]
TRAINED_BN = ["--model.freeze_bn=false"]  # the EMA run and its twin without averaging train BatchNorm
EMA = ["--train.averaging=ema", "--averaging.ema_decay=0.7", "--averaging.bn_batches=2", *TRAINED_BN]
MAX_RELATIVE_L2 = 1e-4
ZERO2 = ACCELERATE_CONFIGS / "deepspeed_zero2.yaml"


def _has_deepspeed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def averaged_weights(run_dir) -> dict:
    return load_file(run_dir / "checkpoints" / "best_averaged" / "model.safetensors")


def document(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_shards):
    root = tmp_path_factory.mktemp("averaging_runs")
    config = end_to_end_config(root, tiny_shards, max_steps=STEPS, eval_every_steps=1, checkpoint_every_steps=2)
    common = ["--config", str(config), "--algorithm", "erm"]
    folders = {name: root / name for name in ("swad", "swad_resumed", "swad_elastic", "swad_zero2", "ema", "plain")}
    codes = {"swad": train.main(common + SWAD + ["--output_dir", str(folders["swad"])]),
             "swad_cut": train.main(common + SWAD + ["--output_dir", str(folders["swad_resumed"]),
                                                     f"--train.stop_at_step={CUT}"]),
             "swad_resumed": train.main(common + SWAD + ["--output_dir", str(folders["swad_resumed"])]),
             "ema": train.main(common + EMA + ["--output_dir", str(folders["ema"])]),
             "plain": train.main(common + TRAINED_BN + ["--output_dir", str(folders["plain"])])}
    cut = [f"--train.stop_at_step={CUT}"]
    jobs = [common + SWAD + cut + ["--output_dir", str(folders["swad_elastic"])]]
    configs = [None]
    if _has_deepspeed():
        jobs.append(common + SWAD + cut + ["--output_dir", str(folders["swad_zero2"])])
        configs.append(str(ZERO2))
    run_on_ranks(run_trainer_jobs, 2, jobs, [free_port() for _ in jobs], configs, env_init=True, timeout=1500)
    codes["swad_elastic"] = train.main(common + SWAD + ["--output_dir", str(folders["swad_elastic"])])
    if _has_deepspeed():  # resumed on 1 ZeRO-2 rank (its own process: DeepSpeed's environment)
        run_on_ranks(run_trainer_jobs, 1, [common + SWAD + ["--output_dir", str(folders["swad_zero2"])]],
                     [free_port()], [str(ZERO2)], env_init=True, timeout=900)
    return {"root": root, "config": config, "common": common, "codes": codes, **folders}


def test_swad_resumed_on_one_process_is_bit_identical(runs):
    assert runs["codes"] == {"swad": 0, "swad_cut": 75, "swad_resumed": 0, "ema": 0, "plain": 0, "swad_elastic": 0}
    whole, resumed = document(runs["swad"]), document(runs["swad_resumed"])
    block = whole["averaged"]
    assert block["kind"] == "swad" and block["best"] is not None, block
    assert block["window"]["segments"] == STEPS and block["window"]["converge_segment"] is not None
    assert [h["step"] for h in block["history"]] == [STEPS]  # one evaluation, of the final average
    assert resumed["averaged"] == {**block, "best_checkpoint": resumed["averaged"]["best_checkpoint"]}
    expected, got = averaged_weights(runs["swad"]), averaged_weights(runs["swad_resumed"])
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # The average is not the trained model's weights.
    trained = load_file(sorted((runs["swad"] / "checkpoints").glob("checkpoint_*"))[-1] / "model.safetensors")
    assert not torch.equal(expected["features.0.weight"], trained["features.0.weight"])
    # The source validation loss SWAD read is in every evaluation record.
    assert block["window"]["losses"] == [h["val_loss_mean"] for h in whole["history"]]


@pytest.mark.parametrize("kind", ["swad_elastic", "swad_zero2"])
def test_swad_stopped_on_two_ranks_resumed_on_one_continues_the_average(runs, kind):
    if kind == "swad_zero2" and not _has_deepspeed():
        pytest.skip("deepspeed is not installed")
    whole, elastic = document(runs["swad"])["averaged"], document(runs[kind])["averaged"]
    assert elastic["best"] is not None, elastic
    assert elastic["window"]["first_step"] == whole["window"]["first_step"]
    assert elastic["window"]["steps_averaged"] == whole["window"]["steps_averaged"]
    assert relative_l2(averaged_weights(runs[kind]), averaged_weights(runs["swad"])) <= MAX_RELATIVE_L2


def test_the_averaged_best_evaluates_to_what_results_json_reports(runs):
    """best_averaged/ holds whole weights in safetensors (consolidated under ZeRO): rsc_dist.evaluate
    reads it like best/, without DeepSpeed, and reproduces the averaged model's numbers."""
    folder = "swad_zero2" if _has_deepspeed() else "swad"
    result = evaluate.evaluate_checkpoint(runs[folder] / "checkpoints" / "best_averaged", ["--data.batch_size=4"])
    best = document(runs[folder])["averaged"]["best"]
    assert result["step"] == best["step"]
    assert result["val_acc"] == pytest.approx(best["val_acc"], abs=1e-9)
    assert result["per_domain"]["sketch"]["top1"] == pytest.approx(best["target_acc"]["sketch"], abs=1e-9)


def test_ema_with_batchnorm_training_is_evaluated_like_the_trained_model(runs):
    block = document(runs["ema"])["averaged"]
    assert [h["step"] for h in block["history"]] == list(range(1, STEPS + 1))
    assert block["best"] in block["history"]
    assert block["window"]["decay"] == ema_decay(STEPS, 0.7, warmup=True, gamma=1.0, power=0.75)
    weights = averaged_weights(runs["ema"])
    trained = load_file(sorted((runs["ema"] / "checkpoints").glob("checkpoint_*"))[-1] / "model.safetensors")
    # BatchNorm statistics were recomputed for the average (2 batches), not taken from training.
    assert not torch.allclose(weights["features.1.running_mean"], trained["features.1.running_mean"])
    assert int(weights["features.1.num_batches_tracked"]) == 2


def test_averaging_leaves_the_trained_model_as_it_is(runs):
    """The EMA run (evaluating and recomputing BatchNorm for its average at every evaluation)
    trains the very weights of the same run without averaging."""
    def final(name):
        return load_file(sorted((runs[name] / "checkpoints").glob("checkpoint_*"))[-1] / "model.safetensors")

    with_average, without = final("ema"), final("plain")
    assert with_average.keys() == without.keys()
    assert all(torch.equal(with_average[k], without[k]) for k in without)
    assert document(runs["plain"])["averaged"] is None
    assert [h["target_acc"] for h in document(runs["plain"])["history"]] == \
        [h["target_acc"] for h in document(runs["ema"])["history"]]


def test_results_print_the_averaged_models_as_rows(runs, capsys):
    table_root = runs["root"] / "table"
    for name in ("swad", "ema"):
        shutil.copytree(runs[name], table_root / name, ignore=shutil.ignore_patterns("checkpoints"))
    assert results.main([str(table_root), "--metric", "best"]) == 0
    out = capsys.readouterr().out
    # Rows are labelled with the trajectory settings in which the runs differ (the two runs also
    # differ in BatchNorm); an averaged row names its average instead of train.averaging.
    labels = [line.split(" |")[0][2:] for line in out.splitlines() if line.startswith("| ERM")]
    assert len(labels) == 4, out
    for kind in ("ema", "swad"):
        assert [label for label in labels if label.startswith("ERM (") and re.search(rf"train\.averaging={kind}[,)]", label)]
        (averaged,) = [label for label in labels if label.startswith(f"ERM + {kind.upper()}")]
        assert "train.averaging" not in averaged, out


def test_a_run_starts_from_another_runs_folder_with_other_classes(runs, tiny_shards, tmp_path):
    """The pre-train -> fine-tune recipe: ResNet-18 from the SWAD run (6 classes) on 4 classes."""
    from data_prep.convert import convert

    subset = tmp_path / "src"
    classes = ["car", "fish", "house", "star"]
    for domain in (tiny_shards.parent / "src" / "kfold").iterdir():
        for name in classes:
            shutil.copytree(domain / name, subset / domain.name / name)
    convert("imagefolder", subset, tmp_path / "shards", val_fraction=0.25, shard_samples=13, workers=1, progress=False)
    out = tmp_path / "finetune"
    code = train.main(runs["common"] + ["--output_dir", str(out), f"--data.root={tmp_path / 'shards'}",
                                        f"--data.classes=[{','.join(classes)}]", "--train.max_steps=2",
                                        f"--model.pretrained={runs['swad']}"])
    assert code == 0
    best = load_file(out / "checkpoints" / "best" / "model.safetensors")
    assert best["head.fc.weight"].shape == (4, 512)
    assert document(out)["init_fingerprint"] != document(runs["swad"])["init_fingerprint"]
    # It started from the source's backbone: the initial weights it hashed are those.
    from rsc_dist.models.build import build_model
    from rsc_dist.models.weights import weights_fingerprint

    torch.manual_seed(0)
    network = build_model("resnet18", 4, pretrained=str(runs["swad"]))
    assert weights_fingerprint(network.state_dict()) == document(out)["init_fingerprint"]
    source = load_file(runs["swad"] / "checkpoints" / "best" / "model.safetensors")
    assert torch.equal(network.features[0].weight, source["features.0.weight"])


def test_a_deepspeed_checkpoint_folder_is_a_starting_point(runs):
    if not _has_deepspeed():
        pytest.skip("deepspeed is not installed")
    from rsc_dist.models.build import build_model

    checkpoint = sorted((runs["swad_zero2"] / "checkpoints").glob("checkpoint_*"))[-1]
    whole = consolidated_weights(checkpoint)
    network = build_model("resnet18", 6, pretrained=str(checkpoint))
    state = network.state_dict()
    assert all(torch.equal(state[k], whole[k].to(state[k].dtype)) for k in state if k.startswith(("features.", "head.")))


# -- soups of a sweep started from one checkpoint --------------------------------------------------


@pytest.fixture(scope="session")
def soup_sweep(runs):
    root = runs["root"]
    spec = {"name": "soup", "preset": str(runs["config"]), "methods": ["erm"], "seeds": [0],
            "overrides": {"train.max_steps": 2, "train.eval_every_steps": 2}, "shared_init": str(runs["swad"]),
            "space": {"optim.lr": [0.005, 0.01, 0.03]}}
    path = root / "soup.yaml"
    path.write_text(json.dumps(spec))
    sweep, out = load_sweep(path), root / "soup_out"
    write_record(sweep, out)
    codes = [train.main(run.trainer_args(sweep.preset, out)) for run in sweep.runs]
    return {"sweep": sweep, "out": out, "codes": codes, "soup_code": soup.main([str(out)])}


def test_the_sweep_becomes_a_uniform_and_a_greedy_soup(soup_sweep):
    assert soup_sweep["codes"] == [0, 0, 0] and soup_sweep["soup_code"] == 0
    out = soup_sweep["out"]
    folders = {run.name: out / run.relative for run in soup_sweep["sweep"].runs}
    weights = {name: load_file(folder / "checkpoints" / "best" / "model.safetensors") for name, folder in folders.items()}
    scores = {name: json.loads((folder / "checkpoints" / "best" / "evaluation.json").read_text())["val_acc"]
              for name, folder in folders.items()}  # source_val_pooled, the runs' rule

    def mean(names):
        return {k: torch.stack([weights[n][k].double() for n in names]).mean(0).to(weights[names[0]][k].dtype)
                for k in weights[names[0]] if weights[names[0]][k].is_floating_point()}

    uniform = out / "soups" / "erm" / "sketch" / "uniform-s0"
    made = load_file(uniform / "checkpoints" / "best" / "model.safetensors")
    expected = mean(list(weights))
    assert all(torch.equal(made[k], v) for k, v in expected.items())
    assert document(uniform)["variant"] == "uniform soup of 3 runs"

    greedy = document(out / "soups" / "erm" / "sketch" / "greedy-s0")
    trace = greedy["soup"]["ingredients"]
    assert [t["name"] for t in trace] == sorted(scores, key=lambda n: (-scores[n], n))  # best own score first
    best = trace[0]["soup_score"]
    for step in trace[1:]:  # kept iff the soup with it scores at least as well on source validation
        assert step["kept"] == (step["soup_score"] >= best)
        best = max(best, step["soup_score"]) if step["kept"] else best
    kept = [t["name"] for t in trace if t["kept"]]
    made = load_file(out / "soups" / "erm" / "sketch" / "greedy-s0" / "checkpoints" / "best" / "model.safetensors")
    assert all(torch.equal(made[k], v) for k, v in mean(kept).items())
    last_kept = [t for t in trace if t["kept"]][-1]  # the greedy search evaluated this very soup on val
    assert greedy["best"]["val_acc"] == pytest.approx(last_kept["soup_score"], abs=1e-12)
    again = evaluate.evaluate_checkpoint(uniform / "checkpoints" / "best", ["--data.batch_size=4"])
    assert again["val_acc"] == pytest.approx(document(uniform)["best"]["val_acc"], abs=1e-9)


def test_soups_are_rows_of_the_sweeps_table(soup_sweep, capsys):
    assert results.main([str(soup_sweep["out"]), "--metric", "best"]) == 0
    out = capsys.readouterr().out
    assert "| ERM + uniform soup of 3 runs |" in out and "| ERM + greedy soup of 3 runs |" in out, out


def test_runs_with_other_initializations_are_refused_by_name(runs, soup_sweep, tmp_path, capsys):
    """A soup trial (started from the SWAD run) and the EMA run (random init) in one group."""
    trial = soup_sweep["sweep"].runs[0]
    shutil.copytree(soup_sweep["out"] / trial.relative, tmp_path / "a")
    shutil.copytree(runs["ema"], tmp_path / "b")
    entries = [{"name": name, "folder": name, "method": "erm", "target": "sketch", "seed": 0, "trial": i,
                "hparams": {}} for i, name in enumerate("ab")]
    (tmp_path / RECORD_FILE).write_text(json.dumps({"name": "mixed", "runs": entries}))
    assert soup.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "do not share an initialization" in err and "a start from" in err and "b start from" in err, err
