"""What the trainer asks of a domain-generalization method, once per step.

A method is one small class (in the spirit of DomainBed's ``Algorithm``) registered in
``rsc_dist.methods``. The trainer keeps ONE forward, one backward and the optimizer step for
every method, so DDP, DeepSpeed and gradient accumulation need nothing per method; a method
only fills in the hooks below:

- ``Section``: its config section (a frozen dataclass of ``rsc_dist.fields.setting`` fields),
  reachable as ``config.<name>`` and set with ``--<name>.key=value``; None when it has none.
  Only the active method's section is part of a run's trajectory fingerprint.
- ``draws(config, step, steps_per_epoch, sample_ids)``: the step's random or scheduled
  choices, keyword arguments of the model's forward. A pure function of the config, the step
  and the samples' identities in the global order, never of the rank or of state, so any
  number of ranks and a resumed run see the same draws.
- ``transform_features(z, head, labels, **draws)``: what it does to the backbone's features
  z before the head, inside the model's forward (training only); returns the features the head
  sees and a dict of extras (``"mask"`` is drawn as the mask image grids).
- ``loss(logits, labels, extras, domains)``: the training objective, inside autocast, and the
  step's metrics: device scalars named in ``metrics``, logged as ``train/<name>`` (averaged
  over samples). No host sync.

The model's evaluation forward never calls a method: evaluation is the plain ``head(features(x))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # config.py imports this package: no import at run time
    from rsc_dist.config import Config


class Method:
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""  # one line for --help and docs
    Section: ClassVar[type | None] = None
    metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings=None, *, process_group=None, capacity: int | None = None,
                 num_domains: int | None = None):
        """``settings``: the method's config section (its defaults when None);
        ``process_group``: the ranks of a data-parallel run (None on one process);
        ``capacity``: the largest local forward batch of any rank (fixed-size collectives);
        ``num_domains``: how many domain indices the manifest has (training batches carry them)."""
        if settings is None and self.Section is not None:
            settings = self.Section()
        self.settings = settings

    @classmethod
    def from_config(cls, config: "Config", **context) -> "Method":
        return cls(getattr(config, cls.name) if cls.Section is not None else None, **context)

    @classmethod
    def draws(cls, config: "Config", step: int, steps_per_epoch: int, sample_ids: Tensor | None) -> dict:
        return {}

    @classmethod
    def sweep_space(cls, preset: dict) -> dict:
        """This method's own hyperparameters for a sweep's default search space, as sweep-file
        entries ({dotted field: distribution}); ``preset``: the preset's flat resolved config.
        The shared ones (lr, weight decay, batch size) are added by rsc_dist.sweep.space."""
        return {}

    def transform_features(self, z: Tensor, head, labels: Tensor, **draws) -> tuple[Tensor, dict]:
        return z, {}

    def loss(self, logits: Tensor, labels: Tensor, extras: dict, domains: Tensor | None):
        """(loss, {metric name: device scalar})."""
        return F.cross_entropy(logits.float(), labels), {}
