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
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A config problem, with the key (and file) at fault in the message."""


@dataclass(frozen=True)
class RunConfig:
    experiment: str = "default"  # W&B group of a sweep; part of the default output folder
    name: str | None = None  # run name; default "{algorithm}-{target}-seed{seed}"
    output_dir: str | None = None  # default runs/{experiment}/{algorithm}/{target}/seed{seed}
    seed: int = 0


@dataclass(frozen=True)
class DataConfig:
    root: str = "demo"  # shard folder holding _info.json; "demo" = the built-in demo set
    dataset: str = ""  # informational; read from the manifest when empty
    classes: tuple[str, ...] = ()  # when set, the manifest's class list must equal it
    target: tuple[str, ...] = ()  # held-out domain(s)
    sources: tuple[str, ...] = ()  # empty: every domain that is not a target
    image_size: int = 222
    batch_size: int = 64  # per process; per process AND source domain when sampling=balanced
    sampling: str = "merged"  # merged (released code) | balanced (DomainBed)
    flip_double: bool = False  # released recipe: each batch doubled with its mirror image
    random_resized_crop_scale: tuple[float, float] = (0.8, 1.0)
    hflip: bool = True
    color_jitter: float = 0.4
    grayscale: float = 0.1
    workers: int = 4
    shuffle_buffer: int = 1000
    eval_batch_size: int = 128
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet18"
    pretrained: str | None = None  # None | "torchvision" (local cache) | path to weights
    sync_bn: bool = False
    channels_last: bool = True
    compile: bool = False


@dataclass(frozen=True)
class RSCConfig:
    mode: str = "spatial+channel"  # spatial | channel | spatial+channel (per-step draw)
    strategy: str = "top_gradient"  # top_gradient | top_activation | random
    p_spatial: float = 1 / 3
    p_channel: float = 1 / 3.2
    p_batch: float = 1 / 3
    p_batch_schedule: str = "constant"  # constant | released
    global_selection: bool = True  # batch percentage over the global batch of all ranks


@dataclass(frozen=True)
class OptimConfig:
    name: str = "sgd"  # sgd | adam
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class ScheduleConfig:
    name: str = "step"  # step | cosine | constant
    warmup_steps: int = 0
    milestones: tuple[float, ...] = (0.8,)  # step decay points, as fractions of all steps
    gamma: float = 0.1


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    steps_per_epoch: int | None = None  # default: source training samples // global batch
    max_steps: int | None = None  # when set, replaces epochs * steps_per_epoch
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto (from accelerate launch) | no | bf16 | fp16
    eval_every_steps: int | None = None  # default: at the end of every epoch
    checkpoint_every_steps: int | None = None  # default: at the end of every epoch
    keep_checkpoints: int = 2
    log_every_steps: int = 10
    image_log_every_steps: int = 200  # input grid with RSC masks; 0 disables
    agree_every_steps: int = 10  # ranks agree on stop signals and non-finite loss this often
    stop_at_step: int | None = None  # act as if preempted after this step (tests resume paths)


@dataclass(frozen=True)
class WandbConfig:
    project: str = "rsc_dist"
    entity: str | None = None
    group: str | None = None  # default: run.experiment
    job_type: str | None = None  # default: algorithm
    mode: str = "auto"  # auto (offline without an API key) | online | offline | disabled
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    algorithm: str = "rsc"  # rsc | erm
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    rsc: RSCConfig = field(default_factory=RSCConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    preset: str = ""  # the preset this config came from (set by load_config)

    def _target_label(self) -> str:
        return "+".join(self.data.target) or "none"

    def run_label(self) -> str:
        return f"{self.algorithm}-{self._target_label()}-seed{self.run.seed}"

    def resolved_output_dir(self) -> Path:
        if self.run.output_dir:
            return Path(self.run.output_dir).expanduser()
        return Path("runs") / self.run.experiment / self.algorithm / self._target_label() / f"seed{self.run.seed}"


CHOICES = {
    "algorithm": ("rsc", "erm"),
    "data.sampling": ("merged", "balanced"),
    "model.arch": ("resnet18", "resnet50", "alexnet"),
    "rsc.mode": ("spatial", "channel", "spatial+channel"),
    "rsc.strategy": ("top_gradient", "top_activation", "random"),
    "rsc.p_batch_schedule": ("constant", "released"),
    "optim.name": ("sgd", "adam"),
    "schedule.name": ("step", "cosine", "constant"),
    "train.mixed_precision": ("auto", "no", "bf16", "fp16"),
    "wandb.mode": ("auto", "online", "offline", "disabled"),
}
FRACTIONS = ("rsc.p_spatial", "rsc.p_channel", "rsc.p_batch", "data.grayscale")
POSITIVE = ("data.image_size", "data.batch_size", "data.eval_batch_size", "train.epochs",
            "train.grad_accum", "train.log_every_steps", "train.agree_every_steps",
            "train.keep_checkpoints")


# ---------------------------------------------------------------------------------------------
# Building a Config from nested dicts, with type checks


def _coerce(value, annotation, key: str, origin: str):
    """``value`` converted to ``annotation``, or a ConfigError naming ``key``."""
    kind = typing.get_origin(annotation)
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


def _build(cls, values: dict, prefix: str, origin: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(names)}"
            raise ConfigError(f"{origin}: unknown config key {full!r}{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: {full} must be a mapping of its fields; got {value!r}")
            kwargs[key] = _build(annotation, value, f"{full}.", origin)
        else:
            kwargs[key] = _coerce(value, annotation, full, origin)
    return cls(**kwargs)


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
    config = dataclasses.replace(config, preset=name_or_path)
    validate(config)
    return config


def validate(config: Config) -> None:
    flat = to_dict(config)
    for key, allowed in CHOICES.items():
        value = _lookup(flat, key)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}; got {value!r}")
    for key in FRACTIONS:
        value = _lookup(flat, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{key} must be in [0, 1]; got {value}")
    for key in POSITIVE:
        value = _lookup(flat, key)
        if value < 1:
            raise ConfigError(f"{key} must be >= 1; got {value}")
    if not 0 < config.data.random_resized_crop_scale[0] <= config.data.random_resized_crop_scale[1] <= 1:
        raise ConfigError(f"data.random_resized_crop_scale must satisfy 0 < lo <= hi <= 1; "
                          f"got {config.data.random_resized_crop_scale}")
    if set(config.data.target) & set(config.data.sources):
        raise ConfigError(f"data.target {config.data.target} overlaps data.sources {config.data.sources}")


def _lookup(flat: dict, dotted: str):
    node = flat
    for part in dotted.split("."):
        node = node[part]
    return node


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
