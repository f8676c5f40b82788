"""Presets, dotted overrides, and config errors that name the key at fault."""

import pytest

from rsc_dist.config import ConfigError, list_presets, load_config, parse_overrides

PRESETS = ["demo", "pacs_resnet18", "pacs_resnet50", "pacs_alexnet", "vlcs_alexnet",
           "officehome_resnet18", "domainbed_pacs_resnet50", "imagenet_resnet50"]


def test_every_preset_loads_with_both_algorithms():
    assert set(PRESETS) <= set(list_presets())
    for name in PRESETS:
        for algorithm in ("rsc", "erm"):
            config = load_config(name, [f"--algorithm={algorithm}"])
            assert config.algorithm == algorithm and config.data.target


def test_released_recipe_values():
    config = load_config("pacs_resnet50")
    assert config.model.arch == "resnet50" and config.data.flip_double
    assert config.optim.lr == 0.01 and config.optim.weight_decay == 5e-4 and config.train.epochs == 30
    assert config.rsc.p_channel == pytest.approx(1 / 3.2) and config.rsc.p_batch_schedule == "released"
    domainbed = load_config("domainbed_pacs_resnet50")
    assert domainbed.data.sampling == "balanced" and domainbed.optim.name == "adam"
    assert domainbed.rsc.mode == "channel" and domainbed.train.max_steps == 5001  # DomainBed's N_STEPS
    assert domainbed.model.freeze_bn and domainbed.data.holdout_fraction == 0.2
    assert domainbed.run.protocol == "domainbed-2020" and load_config("pacs_resnet50").run.protocol == "rsc-paper"


def test_choice_words_that_yaml_reads_as_booleans():
    assert load_config("demo", ["--wandb.log_model=off"]).wandb.log_model == "off"
    assert load_config("demo", ["--wandb.log_model", "best"]).wandb.log_model == "best"
    with pytest.raises(ConfigError, match="wandb.log_model must be one of"):
        load_config("demo", ["--wandb.log_model=yes"])


def test_help_lists_every_field_with_its_default_and_doc(capsys):
    from rsc_dist.config import describe_fields
    from rsc_dist.train import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    rows = describe_fields()
    assert len(rows) > 60 and all(doc for _, _, doc in rows)
    for flag, kind, doc in rows:
        assert flag in text and kind in text and doc in text


def test_overrides_are_typed():
    config = load_config("demo", ["--rsc.p_batch=0.25", "--data.target", "photo,cartoon",
                                  "--train.max_steps=7", "--model.pretrained=null", "--data.flip_double=true"])
    assert config.rsc.p_batch == 0.25 and config.data.target == ("photo", "cartoon")
    assert config.train.max_steps == 7 and config.model.pretrained is None and config.data.flip_double
    assert parse_overrides(["--a.b=1", "--a.c", "x"]) == {"a": {"b": 1, "c": "x"}}


@pytest.mark.parametrize("overrides, message", [
    (["--rsc.p_bach=0.2"], "unknown config key 'rsc.p_bach'; did you mean rsc.p_batch"),
    (["--nosuch.key=1"], "unknown config key 'nosuch'"),
    (["--data.batch_size=abc"], "data.batch_size must be an integer"),
    (["--data.flip_double=maybe"], "data.flip_double must be true or false"),
    (["--rsc.p_batch=1.5"], r"rsc.p_batch must be in \[0, 1\]"),
    (["--rsc.mode=both"], "rsc.mode must be one of"),
    (["--algorithm=dro"], "algorithm must be one of"),
    (["--data.random_resized_crop_scale=[0.5]"], "needs 2 values"),
    (["--data.target=sketch", "--data.sources=sketch"], "overlaps"),
    (["stray"], "unexpected argument"),
    (["--rsc.p_batch"], "needs a value"),
    # Abbreviations lead to the field (spelling alone pointed learning_rate at optim.name).
    (["--optim.learning_rate=0.1"], "unknown config key 'optim.learning_rate'; did you mean optim.lr"),
    (["--optim.wd=0.1"], "did you mean optim.weight_decay"),
    (["--rsc.mode=chanel"], "did you mean channel"),
    (["--data.holdout_fraction=1.0"], "data.holdout_fraction must be below 1"),
    (["--model.dropout=0.1", "--model.arch=alexnet"], "model.dropout .* needs a backbone whose head is global average"),
    # A protocol label pins what makes the protocol: DomainBed 2020 froze BatchNorm.
    (["--run.protocol=domainbed-2020"], "run.protocol=domainbed-2020 fixes model.freeze_bn=true"),
    (["--run.protocol=domainbed-2024", "--model.freeze_bn=true"], "fixes model.freeze_bn=false"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("demo", overrides)


def test_preset_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  image_sise: 5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'data.image_sise'"):
        load_config(str(bad))
    loop = tmp_path / "loop.yaml"
    loop.write_text(f"base: {loop}\n")
    with pytest.raises(ConfigError, match="loops"):
        load_config(str(loop))


def test_every_preset_names_its_selection_rule():
    """Paper recipes: the released code's pooled source validation; domainbed_*: DomainBed's
    training-domain validation (the mean over source domains). Named in each file, not inherited."""
    import yaml

    from rsc_dist.config import PRESET_DIR

    for name in PRESETS:
        named = (yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()).get("train") or {}).get("selection")
        expected = "source_val_mean" if name.startswith("domainbed_") else "source_val_pooled"
        assert named == expected, f"{name}.yaml: train.selection is {named!r}, expected {expected!r}"
        assert load_config(name).train.selection == expected


def test_every_preset_pins_its_protocol():
    """Named in each file, not inherited: a number's results.json says which table it may stand beside."""
    import yaml

    from rsc_dist.config import PRESET_DIR

    for name in PRESETS:
        named = (yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()).get("run") or {}).get("protocol")
        expected = {"demo": "custom", "domainbed_pacs_resnet50": "domainbed-2020"}.get(name, "rsc-paper")
        assert named == expected, f"{name}.yaml: run.protocol is {named!r}, expected {expected!r}"


def test_the_imagenet_preset_keeps_its_global_batch_on_any_number_of_processes():
    """Planted defect: 32 per process gave 512 on the README's 2 nodes x 8 GPUs."""
    config = load_config("imagenet_resnet50")
    assert config.data.global_batch_size == 256
    assert config.resolved_output_dir(8) == config.resolved_output_dir(16)


def test_commands_in_preset_comments_are_accepted_by_data_prep():
    """A preset comment that shows a data_prep command or option must name real ones."""
    import re

    from data_prep.__main__ import _parser
    from rsc_dist.config import PRESET_DIR

    convert = next(a for a in _parser()._subparsers._group_actions[0].choices.items() if a[0] == "convert")[1]
    options = {s for action in convert._actions for s in action.option_strings}
    formats = next(a.choices for a in convert._actions if "--format" in a.option_strings)
    checked = 0
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        comments = " ".join(line.split("#", 1)[1] for line in path.read_text().splitlines() if "#" in line)
        for command in re.findall(r"data_prep convert ([^;()]*)", comments):
            tokens = command.split()
            for i, token in enumerate(tokens):
                if token == "--format":
                    assert tokens[i + 1] in formats, f"{path.name}: --format {tokens[i + 1]} is not a format"
            checked += 1
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)(?![\w.])", comments):
            if "data_prep" in comments:
                assert flag in options, f"{path.name}: {flag} is not an option of data_prep convert"
    assert checked >= 2


def test_the_default_run_folder_follows_the_resolved_global_batch():
    """Planted defect: 1 and 2 processes with a per-process batch (global batch 32 vs 64) shared a
    run folder, so the second run was refused instead of starting its own."""
    demo = load_config("demo")
    assert demo.resolved_output_dir(1) != demo.resolved_output_dir(2)
    # A global batch fixed over process counts keeps the folder: an elastic resume finds it.
    fixed = load_config("demo", ["--data.global_batch_size=64"])
    assert fixed.resolved_output_dir(1) == fixed.resolved_output_dir(2) == fixed.resolved_output_dir(4)
    # ... and it is the folder of the per-process batch that resolves to the same global batch.
    assert fixed.resolved_output_dir(2) == demo.resolved_output_dir(2)
    balanced = load_config("demo", ["--data.sampling=balanced"])
    assert balanced.resolved_output_dir(1) != balanced.resolved_output_dir(2)
    # The selection rule decides what checkpoints/best/ holds: it is part of the run.
    assert load_config("demo", ["--train.selection=last"]).resolved_output_dir(1) != demo.resolved_output_dir(1)
    # Settings that change nothing about the trajectory keep it.
    assert load_config("demo", ["--train.log_every_steps=3"]).resolved_output_dir(1) == demo.resolved_output_dir(1)


def test_the_trainer_names_its_folder_with_the_launchers_process_count(monkeypatch, tmp_path):
    from rsc_dist import train
    from rsc_dist.trainer import build

    seen = []

    def stop(config, run_dir):
        seen.append(run_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "make_accelerator", stop)
    monkeypatch.chdir(tmp_path)
    config, args = train.resolve_config(["--config", "demo"])
    for world_size in ("2", "1"):
        monkeypatch.setenv("WORLD_SIZE", world_size)
        with pytest.raises(KeyboardInterrupt):
            train.run(config, args.resume)
    assert seen == [config.resolved_output_dir(2).resolve(), config.resolved_output_dir(1).resolve()]


def test_what_a_domainbed_run_cannot_keep_on_several_processes_is_refused():
    """DomainBed 2024's BatchNorm trains (freeze_bn false): per-process statistics would be another
    computation; every DomainBed run's batch is per source domain, not per process."""
    from rsc_dist.config import flatten, to_dict
    from rsc_dist.core.protocols import check_world_size

    config = flatten(to_dict(load_config("demo", ["--run.protocol=domainbed-2024", "--data.global_batch_size=96"])))
    check_world_size("domainbed-2024", config, 1)
    with pytest.raises(ConfigError, match="on 2 processes each would normalize by its share of the batch"):
        check_world_size("domainbed-2024", config, 2)
    check_world_size("domainbed-2024", {**config, "model.sync_bn": True}, 2)
    # DomainBed's batch is per source domain and step: a per-process batch would grow with the processes.
    preset = flatten(to_dict(load_config("domainbed_pacs_resnet50")))
    check_world_size("domainbed-2020", preset, 1)
    with pytest.raises(ConfigError, match=r"pass --data.global_batch_size=32 x the number of source domains"):
        check_world_size("domainbed-2020", preset, 8)
    check_world_size("domainbed-2020", {**preset, "data.global_batch_size": 96}, 8)
