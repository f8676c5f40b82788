"""The sweep file: validation, deterministic expansion, search spaces, the print launcher."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rsc_dist.config import load_config, to_dict
from rsc_dist.sweep.cli import main as sweep_main
from rsc_dist.sweep.space import Distribution, unit
from rsc_dist.sweep.spec import SweepError, load_sweep
from rsc_dist.sweep.state import check_finished_runs

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, values: dict, name: str = "sw.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


SEARCH = {
    "preset": "demo", "methods": ["erm", "rsc"], "targets": ["sketch", "photo"], "seeds": [0, 1],
    "overrides": {"train.max_steps": 10},
    "space": {"optim.weight_decay": [0.0, 5e-4], "optim.lr": {"log_uniform": [1e-4, 1e-1]},
              "data.batch_size": {"int_log_uniform": [8, 45]}, "rsc.p_batch": {"uniform": [0.1, 0.5]}},
    "method_space": {"rsc": {"rsc.p_spatial": {"choice": [0.2, 0.33]}}},
    "n_trials": 3, "search_seed": 7,
}


def test_expansion_is_deterministic_and_every_run_resolves_to_its_values(tmp_path):
    path = write(tmp_path, SEARCH)
    sweep = load_sweep(path)
    again = load_sweep(path)
    assert [(r.name, r.hparams, r.overrides) for r in sweep.runs] == [(r.name, r.hparams, r.overrides) for r in again.runs]
    # 2 weight decays x 3 draws; ERM's space has no rsc.* fields.
    assert sweep.n_trials == {"erm": 6, "rsc": 6}
    assert len(sweep.runs) == 2 * 2 * 6 * 2
    assert len({r.name for r in sweep.runs}) == len({r.relative for r in sweep.runs}) == len(sweep.runs)
    erm = [r for r in sweep.runs if r.method == "erm"]
    rsc = [r for r in sweep.runs if r.method == "rsc"]
    assert all(set(r.hparams) == {"optim.weight_decay", "optim.lr", "data.batch_size"} for r in erm)
    assert all(set(r.hparams) == {"optim.weight_decay", "optim.lr", "data.batch_size", "rsc.p_batch",
                                  "rsc.p_spatial"} for r in rsc)
    for run in sweep.runs:
        h = run.hparams
        assert 1e-4 <= h["optim.lr"] < 1e-1 and isinstance(h["data.batch_size"], int) and 8 <= h["data.batch_size"] < 45
        config = run.config()
        assert (config.algorithm, config.run.seed, config.data.target) == (run.method, run.seed, (run.target,))
        assert config.optim.lr == h["optim.lr"] and config.data.batch_size == h["data.batch_size"]
        assert config.optim.weight_decay == h["optim.weight_decay"] and config.train.max_steps == 10
        if run.method == "rsc":
            assert config.rsc.p_batch == h["rsc.p_batch"] and config.rsc.p_spatial in (0.2, 0.33)
        assert run.relative == Path(run.method) / run.target / f"t{run.trial:02d}-s{run.seed}"
    # A trial's values are shared by targets and seeds, and draw k is the same for both methods.
    by_trial = {}
    for run in sweep.runs:
        by_trial.setdefault((run.method, run.trial), set()).add(json.dumps(run.hparams, sort_keys=True))
    assert all(len(v) == 1 for v in by_trial.values())
    for trial in range(6):
        e = next(r.hparams for r in erm if r.trial == trial)
        s = next(r.hparams for r in rsc if r.trial == trial)
        assert {k: s[k] for k in e} == e
    # Another search seed draws other values; the grid axis is crossed with the same draws.
    other = load_sweep(write(tmp_path, {**SEARCH, "search_seed": 8}, "other.yaml"))
    assert {r.hparams["optim.lr"] for r in other.runs}.isdisjoint({r.hparams["optim.lr"] for r in sweep.runs})
    lrs = [next(r.hparams["optim.lr"] for r in erm if r.trial == t) for t in range(6)]
    assert lrs[:3] == lrs[3:] and len(set(lrs)) == 3


def test_distributions_draw_from_a_hash_of_seed_draw_and_field():
    u = unit(0, 1, "optim.lr")
    assert u == unit(0, 1, "optim.lr") and 0 <= u < 1
    assert len({unit(0, d, "optim.lr") for d in range(50)}) == 50
    assert Distribution("log_uniform", (1e-4, 1e-2)).draw(0.5) == pytest.approx(1e-3)
    assert Distribution("uniform", (0.0, 0.5)).draw(0.5) == 0.25
    assert Distribution("int_uniform", (8.0, 12.0)).draw(0.99) == 11
    assert Distribution("choice", ("a", "b", "c")).draw(0.7) == "c"


def test_default_spaces_follow_the_preset(tmp_path):
    # The paired protocol's default spaces are relative to the preset (SGD and Adam recipes alike).
    sweep = load_sweep(write(tmp_path, {"preset": "domainbed_pacs_resnet50", "methods": ["erm", "rsc"],
                                        "default_space": True, "n_trials": 20, "targets": ["sketch"],
                                        "overrides": {"data.root": "/shared/shards/pacs_domainbed"}}))
    assert sweep.n_trials == {"erm": 20, "rsc": 20} and len(sweep.runs) == 2 * 20
    erm = next(r for r in sweep.runs if r.method == "erm")
    rsc = next(r for r in sweep.runs if r.method == "rsc")
    assert set(erm.hparams) == {"optim.lr", "optim.weight_decay", "data.batch_size"}
    # DomainBed's RSC masks channels: p_channel and p_batch are searched, p_spatial is unused.
    assert set(rsc.hparams) == set(erm.hparams) | {"rsc.p_channel", "rsc.p_batch"}
    for run in sweep.runs:
        assert 1e-5 <= run.hparams["optim.lr"] <= 2.5e-4 and 8 <= run.hparams["data.batch_size"] < 48
        assert 1e-6 <= run.hparams["optim.weight_decay"] <= 1e-2
        if run.method == "rsc":
            assert 0 <= run.hparams["rsc.p_channel"] <= 0.5 and 0 <= run.hparams["rsc.p_batch"] <= 0.5
    # Each registered method adds its own fields (Method.sweep_space), and only to its own runs.
    from rsc_dist.sweep.space import default_space
    flat = {"optim.lr": 5e-5, "data.batch_size": 32, "rsc.mode": "channel", "rsc.p_batch_schedule": "constant"}
    assert set(default_space("coral", flat)) == set(erm.hparams) | {"coral.penalty_weight"}
    assert not any(key.startswith("coral.") for key in default_space("rsc", flat))
    # The example DomainBed sweep: DomainBed's protocol and registry, 2 x 4 x 20 x 3 runs.
    domainbed = load_sweep(REPO / "launch" / "sweeps" / "domainbed_pacs_resnet50.yaml")
    assert domainbed.protocol == "domainbed" and len(domainbed.runs) == 480
    assert set(next(r for r in domainbed.runs if r.method == "erm").hparams) == {
        "optim.lr", "optim.weight_decay", "data.batch_size", "model.dropout"}
    # The paper's grid: no search, the preset's values.
    paper = load_sweep(REPO / "launch" / "sweeps" / "pacs_resnet18.yaml")
    assert len(paper.runs) == 2 * 4 * 3 and all(r.hparams == {} for r in paper.runs)


@pytest.mark.parametrize("change, message", [
    ({"method": ["erm"]}, "unknown key 'method'; did you mean methods?"),
    ({"space": {"rsc.p_bach": [0.1]}}, "space: unknown config field 'rsc.p_bach'; did you mean rsc.p_batch?"),
    ({"overrides": {"optim.lrr": 1}}, "overrides: unknown config field 'optim.lrr'"),
    ({"space": {"run.seed": [0, 1]}}, "run.seed is set by seeds"),
    ({"space": {"optim.lr": {"gaussian": [0, 1]}}}, "unknown distribution 'gaussian'"),
    ({"space": {"optim.lr": {"log_uniform": [0, 1]}}}, "log_uniform needs LOW > 0"),
    ({"space": {"optim.lr": 0.01, "rsc.p_batch": {"uniform": [0.2, 1.5]}}}, "rsc.p_batch must be in [0, 1]; got 1.5"),
    ({"space": {"optim.lr": [0.1, "fast"]}}, "optim.lr must be a number; got 'fast'"),
    ({"space": {"optim.lr": {"uniform": [0.1, 0.2]}}, "n_trials": None}, "n_trials is needed"),
    ({"space": {"optim.lr": [0.1, 0.2]}, "n_trials": 3}, "n_trials 3 without a distribution"),
    ({"methods": ["erm", "dro"]}, "methods must be one of ('rsc', 'erm', 'coral'"),
    ({"methods": ["erm", "corall"]}, "got 'corall'; did you mean coral?"),
    ({"methods": []}, "methods is empty; name at least one of rsc, erm, coral"),
    ({"seeds": [0, "x"]}, "seeds must be an integer; got 'x'"),
    ({"seeds": [0, -1]}, "seeds must be >= 0; got -1"),
    ({"n_trials": 0}, "n_trials must be >= 1; got 0"),
    ({"method_space": {"rsc": {"rsc.p_spatial": {"uniform": [0.0, 0.5]}}}, "methods": ["erm"]},
     "method_space: 'rsc' is not one of the sweep's methods"),
    ({"slurm": {"sbatch": ["time=1:00:00"]}}, "slurm.sbatch: each entry is an sbatch option"),
    ({"slurm": {"max_paralel": 3}}, "unknown key 'slurm.max_paralel'; did you mean slurm.max_parallel?"),
    # The messages of house issue #23, each naming the real fault.
    ({"preset": "no_such_preset"}, ": preset: unknown preset 'no_such_preset'"),
    ({"methods": ["erm"], "space": {"rsc.p_batch": {"uniform": [0.1, 0.5]}}, "n_trials": 3},
     "space: rsc.p_batch belongs to method rsc, which the sweep does not run (methods: erm)"),
    ({"overrides": {"optim.learning_rate": 0.1}}, "unknown config field 'optim.learning_rate'; did you mean optim.lr?"),
    ({"overrides": {"optim.lr": 0.1}}, "optim.lr is fixed in overrides (or --set) and searched by space for erm"),
    ({"overrides": {"optim.lr": 0.1}, "space": {}, "default_space": True, "n_trials": 2},
     "optim.lr is fixed in overrides (or --set) and searched by default_space for erm"),
    ({"targets": ["sketch", "skecth"]}, "targets ['skecth'] are not domains of the demo dataset"),
    ({"targets": "all", "overrides": {"data.root": "/nonexistent/shards"}}, "targets: all needs the dataset's domains"),
])
def test_bad_files_stop_with_the_file_and_key(tmp_path, change, message, capsys):
    values = {"preset": "demo", "methods": ["erm", "rsc"], "n_trials": 2,
              "space": {"optim.lr": {"uniform": [0.01, 0.02]}}}
    values.update(change)
    values = {k: v for k, v in values.items() if v is not None}
    path = write(tmp_path, values)
    with pytest.raises(SweepError) as info:
        load_sweep(path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert sweep_main([str(path)]) == 2
    assert message in capsys.readouterr().err


def test_erm_has_one_trial_when_only_rsc_fields_are_searched(tmp_path):
    sweep = load_sweep(write(tmp_path, {"preset": "demo", "methods": ["erm", "rsc"], "n_trials": 3,
                                        "space": {"rsc.p_batch": {"uniform": [0.1, 0.5]}, "optim.lr": [0.01, 0.02]}}))
    assert sweep.n_trials == {"erm": 2, "rsc": 6}


def test_print_lists_every_run_and_a_dry_run_never_runs(tmp_path, capsys):
    path = write(tmp_path, SEARCH)
    out = tmp_path / "out"
    assert sweep_main([str(path), "--out", str(out), "--launcher", "print"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 48 and lines[0].split()[:3] == ["0", "erm-sketch-t00-s0", "new"]
    for launcher in ("local", "slurm", "one", "wandb"):
        index = ["--index", "0"] if launcher == "one" else []
        assert sweep_main([str(path), "--out", str(out), "--launcher", launcher, "--dry-run", *index]) == 0
    assert not out.exists(), "a dry run must not write anything"
    capsys.readouterr()
    # Written after `--` (as the old sweep.sh's README comment suggested): refused, nothing runs.
    assert sweep_main([str(path), "--out", str(out), "--launcher", "slurm", "--", "--dry-run"]) == 2
    assert "not after --" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--launcher", "local", "--parallel", "-1"], "--parallel must be at least 1; got -1"),
    (["--launcher", "local", "--parallel", "0"], "--parallel must be at least 1; got 0"),
    (["--launcher", "local", "--gpus-per-run", "0"], "--gpus-per-run must be at least 1; got 0"),
    (["--launcher", "slurm", "--parallel", "2"], "--parallel: option(s) of --launcher local"),
    (["--launcher", "local", "--index", "3"], "--index: option(s) of --launcher one"),
])
def test_launcher_options_are_checked_before_anything_is_written(tmp_path, capsys, args, message):
    """Planted defects: --parallel -1 raised IndexError after taking the lock and writing
    sweep.json; --parallel 0 silently ran one at a time."""
    out = tmp_path / "out"
    assert sweep_main([str(write(tmp_path, SEARCH)), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_a_sweep_that_cannot_check_its_dataset_is_listed_but_not_started(tmp_path, capsys):
    path = write(tmp_path, {**SEARCH, "overrides": {"data.root": str(tmp_path / "nowhere"), "train.max_steps": 10}})
    assert sweep_main([str(path), "--out", str(tmp_path / "out")]) == 0
    assert "has no _info.json on this machine: domains and classes not checked" in capsys.readouterr().out
    assert sweep_main([str(path), "--out", str(tmp_path / "out"), "--launcher", "local"]) == 2
    assert "nothing is started" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_slurm_dry_run_shows_the_array_job(tmp_path):
    path = write(tmp_path, {**SEARCH, "slurm": {"sbatch": ["--time=2:00:00"], "max_parallel": 3}})
    out = tmp_path / "out"
    done = out / "erm" / "sketch" / "t00-s0"
    done.mkdir(parents=True)
    sweep = load_sweep(path)
    (done / "results.json").write_text(json.dumps({"config": {}}))
    p = subprocess.run([sys.executable, "-m", "rsc_dist.sweep", str(path), "--launcher", "slurm", "--out", str(out),
                        "--sbatch=--partition=gpu", "--dry-run"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "(47 to run, 1 already finished)" in p.stdout
    submit = next(line for line in p.stdout.splitlines() if " sbatch " in line)
    for part in (f"RSC_TASK_FILE={out}/tasks-", "--job-name=sw", "--array=0-46%3", f"--output={out}/logs/%x-%A_%a.out",
                 "--time=2:00:00 --partition=gpu", "launch/slurm/train.sbatch --config demo"):
        assert part in submit, part
    tasks = [line.split(": ", 1)[1].split() for line in p.stdout.splitlines() if line.startswith("# task ")]
    assert len(tasks) == 47
    expected = [r for r in sweep.runs if r.name != "erm-sketch-t00-s0"]
    for args, run in zip(tasks, expected):
        assert args[:3] == ["train.py", "--config", "demo"]
        assert args[3:] == run.trainer_args("demo", out)[2:]
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == ["results.json"]


def test_a_finished_run_made_with_other_settings_is_not_counted(tmp_path):
    path = write(tmp_path, {"preset": "demo", "methods": ["erm"], "targets": ["sketch"],
                            "space": {"optim.lr": [0.01]}})
    sweep = load_sweep(path)
    out = tmp_path / "out"
    (out / sweep.runs[0].relative).mkdir(parents=True)
    config = to_dict(sweep.runs[0].config())
    (out / sweep.runs[0].relative / "results.json").write_text(json.dumps({"config": config}))
    assert check_finished_runs(sweep.runs, out) == {sweep.runs[0].name: "done"}
    config["optim"]["lr"] = 0.02
    (out / sweep.runs[0].relative / "results.json").write_text(json.dumps({"config": config}))
    with pytest.raises(SweepError, match=r"optim.lr: 0.02 -> 0.01"):
        check_finished_runs(sweep.runs, out)


def test_the_example_sweeps_expand(capsys):
    for path in sorted((REPO / "launch" / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path)
        assert sweep.runs, path
        for run in sweep.runs[:3]:
            assert load_config(sweep.preset, list(run.overrides)).algorithm == run.method


def test_a_preset_file_beside_the_sweep_is_found_from_anywhere(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"base": "demo", "optim": {"lr": 0.05}}))
    path = write(tmp_path, {"preset": "mine.yaml", "methods": ["erm"], "targets": ["sketch"]})
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path)
    assert sweep.preset == str(tmp_path / "mine.yaml")
    assert sweep.runs[0].config().optim.lr == 0.05
