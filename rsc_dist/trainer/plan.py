"""What a run reads and how much of it per step: the manifest, the domains, the batch sizes and
the step counts, all derived once from the config and the number of ranks.

The batch quantities have one name each, used everywhere (streams, checkpoints, reports):

    global_batch           samples all ranks read per step: data.global_batch_size, or
                           data.batch_size x groups x ranks
    global_batch_per_group the part of it each sampling group gives (a group is a source domain
                           with sampling=balanced, the pooled sources with sampling=merged)
    local_batch_per_group  samples one rank takes from each group per step
    local_batch            samples one rank reads per step (x groups)
    forward_copies         2 with data.flip_double (each image and its mirror image), else 1
    local_forward_batch    images in one rank's forward pass (local_batch x forward_copies); the
                           RSC all-gather's capacity
    global_forward_batch   images in one step's forward passes, all ranks
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from rsc_dist.config import Config, ConfigError
from rsc_dist.data.augment import Augment
from rsc_dist.data.holdout import Holdout, draw_holdout
from rsc_dist.data.order import ShardRef
from rsc_dist.data.streams import EvalStream, TrainStream, check_shard_sizes, make_loader

# What a checkpoint records about the sample order; a different one cannot continue the run.
ORDER_VERSION = 2

DEFAULT_CACHE = Path(os.environ.get("RSC_DIST_CACHE", Path.home() / ".cache" / "rsc_dist"))


class DataPlan:
    def __init__(self, config: Config, root: Path, world_size: int):
        from data_prep.manifest import ManifestError, load_manifest

        try:
            self.manifest = load_manifest(root)
        except ManifestError as exc:
            raise ConfigError(f"data.root={root}: {exc}") from exc
        self.config = config
        self.world_size = world_size
        domains = self.manifest.domains
        self.domains = tuple(domains)
        if config.data.classes and tuple(config.data.classes) != tuple(self.manifest.classes):
            raise ConfigError(f"data.classes {list(config.data.classes)} does not match the classes of "
                              f"{root}/_info.json: {list(self.manifest.classes)} (wrong data.root?)")
        unknown = [d for d in config.data.target + config.data.sources if d not in domains]
        if unknown:
            raise ConfigError(f"domains {unknown} (data.target/data.sources) are not in "
                              f"{root}/_info.json, which has {list(domains)}")
        if not config.data.target:
            raise ConfigError(f"data.target is empty; choose held-out domain(s) from {list(domains)}")
        self.targets = config.data.target
        self.sources = config.data.sources or tuple(d for d in domains if d not in self.targets)
        if not self.sources:
            raise ConfigError("no source domain left: every domain is a target")
        # DomainBed's load-time split of every domain (data.holdout_fraction); None: the shards' own.
        self.holdout = self._draw_holdout()
        source_splits = ("train", "val", "test") if self.holdout else ("train", "val")
        self.train_urls = {d: self._paths(d, ("train",) if not self.holdout else source_splits) for d in self.sources}
        empty = [d for d in self.sources if not self._training_refs(d)]
        if empty:
            raise ConfigError(f"source domains {empty} have no 'train' shards in {root}/_info.json"
                              + (" (or no sample left by data.holdout_fraction)" if self.holdout else ""))
        self.val_urls = [u for d in self.sources for u in self._paths(d, ("val",))]
        self.target_urls = [u for d in self.targets for u in self._paths(d, ("train", "val", "test"))]
        missing = [u for u in self._all_urls() if not Path(u).is_file()]
        if missing:
            raise ConfigError(f"{len(missing)} shard(s) listed in {root}/_info.json are missing, "
                              f"e.g. {missing[0]}; rerun data_prep convert or check data.root")
        check_shard_sizes(self._shard_refs(self.sources, source_splits) +
                          self._shard_refs(self.targets, ("train", "val", "test")))
        groups = len(self.sources) if config.data.sampling == "balanced" else 1
        self.global_batch = config.data.global_batch_size or config.data.batch_size * groups * world_size
        if self.global_batch % (groups * world_size):
            raise ConfigError(f"data.global_batch_size={self.global_batch} does not divide into {world_size} "
                              f"process(es) x {groups} sampling group(s); choose a multiple of {groups * world_size}")

        train_samples = sum(r.size for d in self.sources for r in self._training_refs(d))
        accumulation = config.train.grad_accum
        # Every checkpoint must fall on the end of an accumulation window: pending gradients
        # are not part of a checkpoint. Derived epochs are rounded down to whole windows.
        self.steps_per_epoch = config.train.steps_per_epoch or (
            train_samples // self.global_batch // accumulation * accumulation)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"{train_samples} training samples cannot fill one global batch of "
                              f"{self.global_batch}; lower data.batch_size or set train.steps_per_epoch")
        self.total_steps = config.train.max_steps or config.train.epochs * self.steps_per_epoch
        for key, value in (("train.steps_per_epoch", self.steps_per_epoch), ("train.max_steps", self.total_steps),
                           ("train.checkpoint_every_steps", config.train.checkpoint_every_steps),
                           ("train.agree_every_steps", config.train.agree_every_steps),
                           ("train.stop_at_step", config.train.stop_at_step)):
            if value and value % accumulation:
                raise ConfigError(f"{key}={value} must be a multiple of train.grad_accum={accumulation} "
                                  "(checkpoints and stops happen between accumulation windows)")

    # -- batch quantities (see the module docstring) ----------------------------------------

    @functools.cached_property
    def groups(self) -> dict[str, list[ShardRef]]:
        """Sampling group -> its training shards, in a fixed (sorted) order."""
        def nonempty(refs):
            return [r for r in refs if r.num_samples]

        if self.config.data.sampling == "balanced":
            return {d: nonempty(self._training_refs(d)) for d in self.sources}
        return {"merged": nonempty(sorted((r for d in self.sources for r in self._training_refs(d)),
                                          key=lambda r: r.path))}

    @property
    def source_indices(self) -> tuple[int, ...]:
        """The manifest indices of the source domains, in sampling-group order."""
        return tuple(self.domains.index(d) for d in self.sources)

    @property
    def global_batch_per_group(self) -> int:
        return self.global_batch // len(self.groups)

    @property
    def local_batch_per_group(self) -> int:
        return self.global_batch_per_group // self.world_size

    @property
    def local_batch(self) -> int:
        return self.local_batch_per_group * len(self.groups)

    @property
    def forward_copies(self) -> int:
        return 2 if self.config.data.flip_double else 1

    @property
    def local_forward_batch(self) -> int:
        return self.local_batch * self.forward_copies

    @property
    def global_forward_batch(self) -> int:
        return self.global_batch * self.forward_copies

    def data_order(self) -> dict:
        """What decides which samples each global step reads (independent of ranks and workers).
        A checkpoint records it; resuming with another one would not continue the same run."""
        return {"order_version": ORDER_VERSION, "global_batch": self.global_batch,
                "steps_per_epoch": self.steps_per_epoch, "groups": list(self.groups),
                "block_shards": self.config.data.shuffle_block_shards}

    # -- the validation split ------------------------------------------------------------------

    def _draw_holdout(self) -> Holdout | None:
        fraction = self.config.data.holdout_fraction
        if not fraction:
            return None
        return draw_holdout(self.manifest, self.sources + self.targets, fraction, self.config.data.holdout_seed)

    def _training_refs(self, domain: str) -> list[ShardRef]:
        """A source domain's training samples: its in-split, or its 'train' shards."""
        if self.holdout:
            return self.holdout.splits[domain].inside
        return self._shard_refs((domain,), ("train",))

    def validation_counts(self) -> dict[str, int]:
        """Validation samples of each source domain (what selection by source validation needs)."""
        if self.holdout:
            return {d: self.holdout.splits[d].out_count for d in self.sources}
        return {d: self.manifest.num_samples(d, "val") for d in self.sources}

    def evaluation_sets(self) -> dict[str, list[ShardRef] | list[str]]:
        """{role: what it evaluates}: "val" (the sources' validation), "target" (the targets:
        whole, or their in-split with a holdout) and, with a holdout, "target_out" (the targets'
        out-split, which DomainBed's oracle reads). Shard paths, or ShardRefs with a selection."""
        if not self.holdout:
            return {"val": self.val_urls, "target": self.target_urls}
        splits = self.holdout.splits
        return {"val": [r for d in self.sources for r in splits[d].outside],
                "target": [r for d in self.targets for r in splits[d].inside],
                "target_out": [r for d in self.targets for r in splits[d].outside]}

    # -- streams ------------------------------------------------------------------------------

    def _shard_refs(self, domains, splits: tuple[str, ...]) -> list[ShardRef]:
        refs = [ShardRef(str(self.manifest.root / shard.file), shard.num_samples, shard.num_bytes,
                         getattr(shard, "sample_offsets", None))
                for domain in domains for split in splits for shard in self.manifest.shards(domain, split)]
        return sorted(refs, key=lambda r: r.path)

    def _paths(self, domain: str, splits: tuple[str, ...]) -> list[str]:
        present = self.manifest.splits[domain]
        return [str(p) for s in splits if s in present for p in self.manifest.shard_paths(domain, s)]

    def _all_urls(self) -> list[str]:
        return [u for urls in self.train_urls.values() for u in urls] + self.val_urls + self.target_urls

    def train_stream(self, rank: int, device_type: str) -> TrainStream:
        """Rank ``rank``'s training stream; ``device_type`` of the training device decides where
        data.decode=auto decodes (on CUDA: on the device)."""
        decode = self.config.data.decode
        on_device = decode == "device" or (decode == "auto" and device_type == "cuda")
        return TrainStream(list(self.groups.values()), global_batch_per_group=self.global_batch_per_group,
                           steps_per_epoch=self.steps_per_epoch, seed=self.config.run.seed, rank=rank,
                           world_size=self.world_size, augment=augment_of(self.config),
                           block_shards=self.config.data.shuffle_block_shards, decode_on_device=on_device)

    def eval_loaders(self, rank: int, pin: bool) -> dict:
        loaders = {}
        for role, shards in self.evaluation_sets().items():
            if shards:
                urls, selection = selected_samples(shards)
                stream = EvalStream(urls, rank=rank, world_size=self.world_size, augment=augment_of(self.config),
                                    batch_size=self.config.data.eval_batch_size, selection=selection)
                loaders[role] = make_loader(stream, min(self.config.data.workers, len(urls)), pin)
        return loaders


def selected_samples(shards: list) -> tuple[list[str], dict[str, frozenset[int]] | None]:
    """(shard paths, {path: the sample indices that take part} or None for all): an evaluation
    set given as paths or as ShardRefs with a selection."""
    if all(isinstance(s, str) for s in shards):
        return list(shards), None
    return [r.path for r in shards], {r.path: frozenset(r.sample_indices().tolist()) for r in shards}


def augment_of(config: Config) -> Augment:
    d = config.data
    return Augment(d.image_size, d.random_resized_crop_scale, d.hflip, d.color_jitter, d.grayscale)


def data_root(config: Config, main_process_first) -> Path:
    """The shard folder; for "demo", generate the demo set once (main process first)."""
    if config.data.root != "demo":
        return Path(config.data.root).expanduser()
    from data_prep.demo import ensure_demo_shards

    with main_process_first():
        return Path(ensure_demo_shards(DEFAULT_CACHE / "demo"))
