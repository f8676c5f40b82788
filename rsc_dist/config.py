"""Typed run configuration: frozen dataclasses, YAML presets, dotted command-line overrides.

    cfg = load_config("pacs_resnet18", ["--rsc.p_batch=0.25", "--data.target=sketch"])
    cfg.rsc.p_batch  # 0.25

A preset is a YAML file in ``rsc_dist/configs/`` (by name) or any path; ``base: NAME`` inherits
from another preset. Unknown keys and wrong types are errors that name the key and the file.
Launch-time parallelism (processes, nodes, DeepSpeed) is not here: it belongs to accelerate
configs and the launch scripts.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import yaml

from rsc_dist import methods
from rsc_dist.averaging import settings as averaging_settings
from rsc_dist.averaging.settings import AveragingConfig
from rsc_dist.core import protocols
from rsc_dist.core.errors import ConfigError
from rsc_dist.core.fields import section, setting
from rsc_dist.data.settings import DataConfig
from rsc_dist.models.backbones import BACKBONES, backbone_preprocessing, check_arch
from rsc_dist.models.settings import ModelConfig
from rsc_dist.observe.settings import WandbConfig
from rsc_dist.trainer.settings import OptimConfig, RunConfig, ScheduleConfig, TrainConfig

PRESET_DIR = Path(__file__).parent / "configs"
METHOD_NAMES = methods.NAMES  # the registered methods (rsc_dist.methods)


@dataclass(frozen=True)
class CommonConfig:
    """Every section but the methods' own; ``Config`` adds one section per registered method."""

    algorithm: Literal[METHOD_NAMES] = setting(
        methods.DEFAULT, "the method: " + "; ".join(f"{m.name}: {m.summary}" for m in methods.METHODS.values()))
    run: RunConfig = section(RunConfig)
    data: DataConfig = section(DataConfig)
    model: ModelConfig = section(ModelConfig)
    optim: OptimConfig = section(OptimConfig)
    schedule: ScheduleConfig = section(ScheduleConfig)
    train: TrainConfig = section(TrainConfig)
    averaging: AveragingConfig = section(AveragingConfig)
    wandb: WandbConfig = section(WandbConfig)
    preset: str = setting("", "the preset this config came from (set by load_config)")

    def target_label(self) -> str:
        return "+".join(self.data.target) or "none"

    def run_label(self) -> str:
        return f"{self.algorithm}-{self.target_label()}-seed{self.run.seed}"

    def resolved_output_dir(self, world_size: int) -> Path:
        """The run folder. The default carries the trajectory fingerprint (with the global batch
        that ``world_size`` processes resolve to), so changing a setting that changes the
        trajectory starts a new run instead of resuming an unrelated one."""
        if self.run.output_dir:
            return Path(self.run.output_dir).expanduser()
        return (Path("runs") / self.run.experiment / self.algorithm / self.target_label()
                / f"seed{self.run.seed}-{trajectory_fingerprint(self, world_size)[:8]}")


# The run configuration: the common sections, then one section per registered method that has
# one (``config.rsc``, ``config.coral``), named after the method.
Config = dataclasses.make_dataclass(
    "Config", [(name, cls, section(cls)) for name, cls in methods.sections().items()],
    bases=(CommonConfig,), frozen=True)
Config.__module__ = __name__
Config.__doc__ = "The run configuration (rsc_dist.config): common sections and each method's own."


# Settings that do not change which weights a run reaches (where it writes, how it logs, how
# fast it goes, how often it looks): excluded from the trajectory fingerprint, so they may
# change when a run is resumed. (model.compile and train.cpu_threads change float rounding,
# not the algorithm, as another number of ranks does; results.json records the threads.) Keys are dotted; a section name excludes the whole section.
# The two batch-size settings are excluded because what matters is the global batch they
# resolve to with the number of processes: the fingerprint hashes that (resolved_batch), and
# checkpoints check it (plan.data_order). train.selection stays in: it decides which weights
# checkpoints/best/ holds, so a run cannot switch rules halfway.
NOT_TRAJECTORY = (
    "preset", "run.experiment", "run.name", "run.output_dir", "data.root", "data.workers",
    "data.batch_size", "data.global_batch_size",
    "data.eval_batch_size", "model.compile", "model.channels_last", "train.eval_every_steps",
    "train.checkpoint_every_steps", "train.keep_checkpoints", "train.log_every_steps",
    "train.image_log_every_steps", "train.agree_every_steps", "train.stop_at_step", "train.tracker",
    "train.cpu_threads", "wandb", "run.protocol",
)
# Settings added after runs were made, {key: the value that reproduces those runs}: at that
# value a setting is left out of the trajectory settings, so the runs' fingerprints (their
# default folders) and their checkpoints' settings stay what they were.
ADDED_SETTINGS = {"data.holdout_fraction": 0.0, "data.holdout_seed": 0, "model.dropout": 0.0,
                  "model.head_blocks": None}
# Trajectory settings added after runs were saved without them, with the value that computes
# what those runs computed: a checkpoint or results.json that lacks one is read with it.
EARLIER_DEFAULTS = {"train.selection": "source_val_pooled", **ADDED_SETTINGS}


def trajectory_settings(config: "Config") -> dict:
    """Flat {dotted key: value} of the settings that define the run's trajectory: only the
    active method's section among the methods' (an ERM run does not depend on rsc.*), and of
    the averaging settings only those of train.averaging's kind (none without averaging: the
    averaged model lives in the run folder, so a run with another average is another run)."""
    return trajectory_items(flatten(to_dict(config)), config.algorithm)


def trajectory_items(flat: dict, algorithm: str) -> dict:
    """``trajectory_settings`` of a config given as flat {dotted key: value} (a recorded one, from
    results.json, may come from an older version: sections of unknown methods are dropped too)."""
    skipped = (NOT_TRAJECTORY + tuple(name for name in methods.sections() if name != algorithm)
               + averaging_settings.inactive_keys(flat.get("train.averaging", "none")))
    return {key: value for key, value in flat.items()
            if not any(key == skip or key.startswith(skip + ".") for skip in skipped)
            and not (key in ADDED_SETTINGS and value == ADDED_SETTINGS[key])}


def resolved_batch(config: "Config", world_size: int) -> dict:
    """The global batch the batch settings resolve to on ``world_size`` processes, as far as it
    is known without the data: data.global_batch_size, or data.batch_size x processes (per
    source domain with sampling=balanced, whose number of groups the data decides)."""
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1; got {world_size}")
    data = config.data
    if data.global_batch_size:
        return {"data.resolved_global_batch": data.global_batch_size}
    if data.sampling == "balanced":
        return {"data.resolved_global_batch_per_source": data.batch_size * world_size}
    return {"data.resolved_global_batch": data.batch_size * world_size}


def trajectory_fingerprint(config: "Config", world_size: int) -> str:
    """Hash of the trajectory settings and the resolved global batch: runs that would train
    differently never share a default run folder, and a run resumed on another number of
    processes with the same global batch (data.global_batch_size) keeps its folder."""
    settings = {**trajectory_settings(config), **resolved_batch(config, world_size)}
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def flatten(tree: dict, prefix: str = "", leaf: Callable[[Any], Any] | None = None) -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a nested config dict with dotted keys. ``leaf``, if given,
    converts each value (lists to tuples for hashing, non-scalars to text for TensorBoard)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}.", leaf))
        else:
            flat[f"{prefix}{key}"] = value if leaf is None else leaf(value)
    return flat


def describe_fields(cls=None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(``--section.key``, type and default, doc) for every config field, for ``--help``."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            rows += describe_fields(annotation, f"{prefix}{f.name}.")
            continue
        if f.name == "preset":
            continue
        default = f.default
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        rows.append((f"--{prefix}{f.name}", f"{_type_name(annotation)} = {shown!s}", f.metadata.get("doc", "")))
    return rows


def _type_name(annotation) -> str:
    kind = typing.get_origin(annotation)
    if kind is Literal:
        return "{" + "|".join(map(str, typing.get_args(annotation))) + "}"
    if kind in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None)) + " | null"
    if kind is tuple:
        args = typing.get_args(annotation)
        return f"list of {_type_name(args[0])}" if len(args) == 2 and args[1] is Ellipsis else (
            f"{len(args)} x {_type_name(args[0])}")
    return getattr(annotation, "__name__", str(annotation))


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts, with type checks


def _coerce(value, annotation, key: str, origin: str):
    """``value`` converted to ``annotation``, or a ConfigError naming ``key``."""
    kind = typing.get_origin(annotation)
    if kind is Literal:
        allowed = typing.get_args(annotation)
        if isinstance(value, bool):  # YAML 1.1 reads off/on/no/yes as booleans: take the word back
            words = ("off", "no", "false", "n") if value is False else ("on", "yes", "true", "y")
            value = next((w for w in words if w in allowed), value)
        if value not in allowed:
            close = suggest(value, [str(a) for a in allowed]) if isinstance(value, str) else None
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"{origin}: {key} must be one of {allowed}; got {value!r}{hint}")
        return value
    if kind in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, origin)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{origin}: {key} cannot be null")
    if kind is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key, origin) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{origin}: {key} needs {len(args)} values; got {list(value)}")
        return tuple(_coerce(v, a, key, origin) for v, a in zip(value, args))
    if annotation is dict or kind is dict:
        if value is None:
            return {}
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{origin}: {key} must be a mapping (key: value, ...); got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{origin}: {key} must be true or false; got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{origin}: {key} must be an integer; got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{origin}: {key} must be a number; got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{origin}: {key} must be a string; got {value!r}")
    raise ConfigError(f"{origin}: unsupported type for {key}")  # pragma: no cover


def suggest(name: str, known) -> str | None:
    """The known name a mistyped ``name`` most likely means: an abbreviation either way first
    (learning_rate -> lr, wd -> weight_decay: spelling alone would pick optim.name), then the
    closest spelling; None when nothing is close."""
    name = str(name)

    def initials(word: str) -> str:
        return "".join(part[0] for part in word.split("_") if part)

    known = sorted(known)
    for candidate in known:
        if ("_" in name and initials(name) == candidate) or ("_" in candidate and initials(candidate) == name):
            return candidate
    close = difflib.get_close_matches(name, known, n=1)
    return close[0] if close else None


def suggest_dotted(name: str, known) -> str | None:
    """``suggest`` for dotted field names: within the name's own section first (optim.learning_rate
    -> optim.lr), then among all of them."""
    section_name, _, leaf = str(name).rpartition(".")
    if section_name:
        leaves = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section_name}
        found = suggest(leaf, leaves)
        if found:
            return leaves[found]
    return suggest(name, known)


def _build(cls, values: dict, prefix: str, origin: str, noun: str = "config key"):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = suggest(key, names)
            hint = f"; did you mean {prefix}{close}?" if close else f"; known: {', '.join(names)}"
            raise ConfigError(f"{origin}: unknown {noun} {full!r}{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {full} must be a mapping of its fields; got {value!r}")
            kwargs[key] = _build(annotation, value, f"{full}.", origin, noun)
        else:
            kwargs[key] = _coerce(value, annotation, full, origin)
    return cls(**kwargs)


def parse_section(cls, values, origin: str, noun: str = "key"):
    """``values`` (a mapping, e.g. a parsed YAML file) as the frozen dataclass ``cls``, with the
    checks presets get: unknown keys (with a suggestion), types, declared ranges; a ConfigError
    naming ``origin`` and the key otherwise. The sweep file is read with it."""
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: expected a mapping of keys; got {values!r}")
    parsed = _build(cls, values, "", origin, noun)
    try:
        _check_ranges(parsed, "")
    except ConfigError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    return parsed


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(tree: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


# ---------------------------------------------------------------------------------------------
# Presets and overrides


def preset_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise ConfigError(f"config file {candidate} does not exist")
        return candidate
    path = PRESET_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(list_presets())
        raise ConfigError(f"unknown preset {name_or_path!r}; presets: {known} (or a path to a YAML file)")
    return path


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_preset(name_or_path: str, seen: tuple = ()) -> dict:
    path = preset_path(name_or_path)
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops: {' -> '.join(map(str, seen + (path,)))}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a preset must be a mapping of sections")
    base = values.pop("base", None)
    if base:
        values = _merge(_read_preset(str(base), seen + (path,)), values)
    return values


def parse_overrides(args: list[str]) -> dict:
    """``["--rsc.p_batch=0.25", "--data.target", "sketch"]`` -> nested dict (YAML-typed values)."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"override --{key} needs a value (--{key}=VALUE)")
            raw = args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.replace("-", "_"), value)
        i += 1
    return tree


def load_config(name_or_path: str = "demo", overrides: list[str] | None = None) -> Config:
    values = _read_preset(name_or_path)
    origin = str(preset_path(name_or_path))
    config = _build(Config, values, "", origin)
    if overrides:
        values = _merge(values, parse_overrides(overrides))
        config = _build(Config, values, "", "command line")
    config = dataclasses.replace(config, preset=name_or_path, data=backbone_data_settings(config, values))
    validate(config)
    return config


def backbone_data_settings(config: Config, values: dict):
    """``config.data`` with the input settings the backbone's weights expect (a timm model's
    mean, std and image size) wherever the preset and the command line (``values``) leave them
    unset; the torchvision backbones' are the fields' defaults."""
    data_values = values.get("data") or {}
    follow = {key: value for key, value in backbone_preprocessing(config.model.arch).items() if key not in data_values}
    return dataclasses.replace(config.data, **follow)


def validate(config: Config) -> None:
    """Range checks declared on the fields (``setting(check=...)``), then cross-field rules."""
    _check_ranges(config, "")
    check_arch(config.model.arch)
    if not 0 < config.data.random_resized_crop_scale[0] <= config.data.random_resized_crop_scale[1] <= 1:
        raise ConfigError(f"data.random_resized_crop_scale must satisfy 0 < lo <= hi <= 1; "
                          f"got {config.data.random_resized_crop_scale}")
    if set(config.data.target) & set(config.data.sources):
        raise ConfigError(f"data.target {config.data.target} overlaps data.sources {config.data.sources}")
    for key, value in (("data.holdout_fraction", config.data.holdout_fraction), ("model.dropout", config.model.dropout)):
        if value >= 1:
            raise ConfigError(f"{key} must be below 1; got {value}")
    if config.model.dropout and not (config.model.arch in BACKBONES and BACKBONES[config.model.arch].pooled_linear_head):
        raise ConfigError(f"model.dropout (DomainBed's ResNet dropout, on the pooled features) needs a backbone whose "
                          f"head is global average pooling and one linear layer; {config.model.arch}'s is not")
    averaging_settings.check(config.train.averaging, config.averaging)
    protocols.check_settings(config.run.protocol, flatten(to_dict(config)))


_RANGES = {"fraction": (0.0, 1.0, "in [0, 1]"), "positive": (1, None, ">= 1"), "nonnegative": (0, None, ">= 0")}


def _check_ranges(node, prefix: str) -> None:
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{prefix}{f.name}.")
            continue
        check = f.metadata.get("check")
        if check is None or value is None:
            continue
        low, high, words = _RANGES[check]
        for item in value if isinstance(value, tuple) else (value,):  # a list: each of its values
            if item < low or (high is not None and item > high):
                raise ConfigError(f"{prefix}{f.name} must be {words}; got {item}")


def to_dict(config: Config) -> dict:
    """Plain nested dict (tuples as lists): YAML/JSON/W&B friendly."""

    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
