"""What the trainer asks of a domain-generalization method: it owns its training step.

A method is one small class (in the spirit of DomainBed's ``Algorithm.update``), registered in
``rsc_dist.methods``, built once per run and carried by the training loop (never hidden in the
network). What DomainBed lacks is kept here: the step is computed over the GLOBAL batch of all
ranks, so N ranks compute what one process computes, and a resumed run what an uninterrupted
one computes. The hooks, each optional, from the simplest method to the most involved:

- ``Section``: its config section (a frozen dataclass of ``rsc_dist.core.fields.setting``
  fields), reachable as ``config.<name>``; only the active method's section is part of a run's
  trajectory fingerprint. ``sweep_space``: its hyperparameters for a sweep's default space.
- ``draws(step, steps_per_epoch, sample_ids)``: the step's random or scheduled choices. A pure
  function of the seed, the step and the samples' identities in the global order, never of the
  rank or of state, so any number of ranks and a resumed run see the same draws.
- ``transform_inputs(batch, draws)``: a new batch before the backbone (Mixup mixes images here).
- ``transform_features(z, head, batch, draws)``: what it does to the backbone's features z
  before the head (RSC's mask); returns the features the head sees and a dict of extras.
- ``loss(logits, batch, extras)``: the objective and the step's metrics (device scalars named
  in ``metrics``, logged as ``train/<name>``, averaged over samples). No host sync.
- ``build_modules()``: parameters and persistent state of its own (a discriminator, a second
  head, per-domain weights as buffers), registered on the network as ``network.method`` so DDP
  averages their gradients, DeepSpeed shards them, checkpoints save them (elastic, as all
  weights and buffers) and ``best/`` holds them consolidated. Evaluation never runs them.
- ``parameter_groups(network)``: named groups of the one optimizer, each with its own settings
  (learning rate, weight decay, betas); ``train_step`` may step some groups only.
- ``objective(network, batch, draws)``: the forward of one update, run INSIDE the wrapped
  model's forward (so DDP's hooks and ZeRO-3's parameter gathering see every module it uses):
  by default features -> transform_features -> head -> loss. Features come from
  ``network.featurize(batch)`` (the backbone, then model.dropout, DomainBed's ResNet dropout),
  never from ``network.features`` directly, which would skip the dropout. It returns a ``StepOutput``; new
  values of persistent state go in ``StepOutput.state`` and are written after the forward.
- ``train_step(runner, batch, draws)``: the whole step. The default is one forward, one
  backward and one optimizer step; a method with updates that alternate between parameter sets
  (DANN) or run in sequence (SagNet) overrides it and drives the ``StepRunner``.

Refusals are declared, never silent: ``needs_balanced_sampling``, ``zero_refusal`` and
``grad_accum_refusal`` name why a combination cannot run with the method's meaning intact, and
``check_context`` stops the run with that line (exit 2) before anything trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from rsc_dist.core.errors import ConfigError


@dataclass(frozen=True)
class MethodContext:
    """What a method knows about the run it is built for."""

    seed: int = 0
    num_classes: int = 2
    num_domains: int = 1  # domain indices of the manifest (training batches carry them)
    # The manifest indices of the training (source) domains, in sampling-group order; empty:
    # every domain is a source. A method with one output per training domain (DANN's
    # discriminator) has len(source_domains) of them.
    source_domains: tuple[int, ...] = ()
    feature_dim: int = 0  # channels of the backbone's features z (the pooled feature size)
    # False for a head that reads none of z's locations (a ViT's class-token head on its last
    # layer): a method that mutes locations would change nothing (rsc_dist.models.network).
    locations_reach_logits: bool = True
    process_group: object = None  # the ranks of a data-parallel run; None on one process
    capacity: int | None = None  # the largest local forward batch of any rank (fixed-size gathers)
    balanced: bool = False  # data.sampling=balanced: every step takes the same count from each source
    grad_accum: int = 1
    zero_stage: int | None = None  # DeepSpeed ZeRO stage; None without DeepSpeed
    optimizer: str = "sgd"  # optim.name: which settings a ParamGroup may carry (Adam: betas)


@dataclass(frozen=True)
class StepBatch:
    """One rank's share of a training step, on the device."""

    images: Tensor  # normalized float: what the backbone sees
    labels: Tensor
    pixels: Tensor  # the augmented uint8 images before flip doubling (image grids)
    sample_ids: Tensor | None = None  # each image's identity in the global order (int64)
    domains: Tensor | None = None  # each image's domain index (the manifest's order)
    # Each image's place in the step's GLOBAL batch, the same on any number of ranks: sampling
    # group, then position in the group's share of the step, mirror copies after the originals.
    order: Tensor | None = None
    extras: dict = field(default_factory=dict)  # what transform_inputs adds (Mixup: partner labels, weights)
    step: int | None = None  # the global step it trains (model.dropout's masks hash it with sample_ids)

    def replace(self, **changes) -> "StepBatch":
        return replace(self, **changes)


@dataclass
class StepOutput:
    """What one update computed. ``loss`` keeps its graph inside ``objective``; ``train_step``
    returns it detached."""

    loss: Tensor
    logits: Tensor | None = None  # for train/acc against batch.labels (None: not reported)
    metrics: dict = field(default_factory=dict)  # {metric name: device scalar}
    mask: Tensor | None = None  # a feature mask, drawn over the inputs in the image grids
    mask_mode: str = ""  # the grid caption's word for the mask (RSC: spatial or channel)
    state: dict = field(default_factory=dict)  # {buffer name of network.method: its new value}
    extras: dict = field(default_factory=dict)  # what a later update of the same step reads (detached)


@dataclass(frozen=True)
class ParamGroup:
    """A named group of the optimizer: its parameters and the settings that differ from optim.*."""

    name: str
    params: list
    settings: dict = field(default_factory=dict)  # lr, weight_decay, betas, momentum


class StepRunner(Protocol):
    """What ``Method.train_step`` drives (implemented by rsc_dist.trainer.step)."""

    step: int  # the global step being trained (0-based)

    def forward(self, objective, batch: StepBatch, draws: dict) -> StepOutput:
        """``objective(network, batch, draws)`` inside the prepared model's forward, under autocast."""

    def backward(self, loss: Tensor) -> None: ...

    def optimizer_step(self, groups: tuple[str, ...] | None = None) -> None:
        """Step the named parameter groups (None: all), then clear every gradient."""

    def reset_optimizer_state(self) -> None:
        """Forget the optimizer's state (momenta, step counts), as a newly created optimizer."""

    def write_state(self, state: dict) -> None:
        """Write new values of ``network.method``'s buffers (after a forward, never inside it)."""


class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --help and docs
    Section: ClassVar[type | None] = None
    metrics: ClassVar[tuple[str, ...]] = ()
    # Non-empty: why the method cannot run that way with its meaning intact (check_context stops).
    needs_balanced_sampling: ClassVar[str] = ""
    zero_refusal: ClassVar[str] = ""
    grad_accum_refusal: ClassVar[str] = ""

    def __init__(self, settings=None, context: MethodContext | None = None):
        """``settings``: the method's config section (its defaults when None)."""
        if settings is None and self.Section is not None:
            settings = self.Section()
        self.settings = settings
        self.context = context if context is not None else MethodContext()

    @property
    def process_group(self):
        return self.context.process_group

    def check_context(self) -> None:
        """Stop (ConfigError, exit 2) when the run's setup would change what the method computes."""
        context = self.context
        if self.needs_balanced_sampling and not context.balanced:
            raise ConfigError(f"algorithm={self.name} needs data.sampling=balanced: {self.needs_balanced_sampling}")
        if self.zero_refusal and context.zero_stage is not None:
            raise ConfigError(f"algorithm={self.name} cannot run under DeepSpeed ZeRO (stage {context.zero_stage}): "
                              f"{self.zero_refusal}; launch it without a DeepSpeed config (DDP)")
        if self.grad_accum_refusal and context.grad_accum > 1:
            raise ConfigError(f"algorithm={self.name} cannot run with train.grad_accum={context.grad_accum}: "
                              f"{self.grad_accum_refusal}; raise data.global_batch_size instead")

    @classmethod
    def sweep_space(cls, preset: dict) -> dict:
        """This method's own hyperparameters for a sweep's default search space, as sweep-file
        entries ({dotted field: distribution}); ``preset``: the preset's flat resolved config.
        The shared ones (lr, weight decay, batch size) are added by rsc_dist.sweep.space."""
        return {}

    # -- per step -------------------------------------------------------------------------------

    def draws(self, step: int, steps_per_epoch: int, sample_ids: Tensor | None) -> dict:
        return {}

    def transform_inputs(self, batch: StepBatch, draws: dict) -> StepBatch:
        return batch

    def transform_features(self, z: Tensor, head, batch: StepBatch, draws: dict) -> tuple[Tensor, dict]:
        return z, {}

    def loss(self, logits: Tensor, batch: StepBatch, extras: dict) -> tuple[Tensor, dict]:
        """(loss, {metric name: device scalar}): the mean cross-entropy by default."""
        return F.cross_entropy(logits.float(), batch.labels), {}

    def objective(self, network, batch: StepBatch, draws: dict) -> StepOutput:
        z = network.featurize(batch)  # the backbone, then model.dropout (DomainBed's featurizer)
        z, extras = self.transform_features(z, network.head, batch, draws)
        logits = network.head(z)
        loss, metrics = self.loss(logits, batch, extras)
        return StepOutput(loss, logits, metrics, mask=extras.get("mask"), mask_mode=extras.get("mask_mode", ""))

    def train_step(self, runner: StepRunner, batch: StepBatch, draws: dict) -> StepOutput:
        """One forward, one backward, every parameter group stepped: the step of most methods."""
        batch = self.transform_inputs(batch, draws)
        out = runner.forward(self.objective, batch, draws)
        runner.backward(out.loss)
        runner.write_state(out.state)
        runner.optimizer_step()
        return out

    # -- its own parameters and state -----------------------------------------------------------

    def build_modules(self) -> nn.Module | None:
        """Parameters and buffers of the method's own (``network.method``), built from
        ``self.context`` (feature_dim, num_classes, num_domains); None: it has none."""
        return None

    def parameter_groups(self, network) -> list[ParamGroup]:
        """The optimizer's groups; by default one, "model", of every trainable parameter."""
        return [ParamGroup("model", [p for p in network.parameters() if p.requires_grad])]


def unused_parameters_term(*modules: nn.Module) -> Tensor | float:
    """0 x the sum of every parameter of ``modules``: added to a loss, it puts parameters that an
    update does not use into the graph with a zero gradient. DDP (without
    find_unused_parameters, which would traverse the graph every step) waits for a gradient of
    every parameter in every backward; this costs one small reduction per parameter tensor and
    the all-reduce of those zeros, which DDP does anyway."""
    total = 0.0
    for module in modules:
        for parameter in module.parameters():
            if parameter.requires_grad:
                total = total + parameter.sum() * 0.0
    return total
