"""GroupDRO: group distributionally robust optimization over the source domains (Sagawa, Koh,
Hashimoto and Liang, "Distributionally Robust Neural Networks for Group Shifts", ICLR 2020,
Algorithm 1, as DomainBed's ``GroupDRO`` runs it with every domain's loss at every step).

Per-domain weights q, kept across steps (a buffer of the method's module, ``network.method.q``),
follow an exponentiated-gradient ascent on the per-domain losses; the model descends the
q-weighted loss:

    q_a    <- q_a * exp(eta * L_a)          for every domain a in the step (L_a detached)
    q      <- q / sum(q)
    loss    = sum_a q_a L_a                 over the domains present, q renormalized over them

where L_a is domain a's mean cross-entropy over its samples of the step (DomainBed: the loss of
domain a's minibatch). As in DomainBed, the loss uses the weights updated with this step's
losses.

q covers every domain of the manifest and starts uniform. A domain absent from a step (a
target, or a source that merged sampling did not draw) takes no part in the loss and its q is
not multiplied (exp(eta * 0) = 1, as Sagawa et al.'s released code treats an empty group); the
normalization then shrinks it with the others. Under balanced sampling the sources are present
at every step and the targets never are, so the loss weights are exactly DomainBed's q (which
covers the sources only, ones before its first update); the stored q differs from DomainBed's by
one factor (the targets' share), which the loss never sees.

EXACT under data parallelism: L_a are means over the GLOBAL batch (one all-reduce with a
gradient, rsc_dist.core.collectives), so every rank computes the same q and the same loss. The
new q is written after the forward (StepOutput.state), and as a buffer it is checkpointed,
resumed and resharded like every weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rsc_dist.core.fields import setting
from rsc_dist.methods.base import Method, StepOutput
from rsc_dist.methods.domain_statistics import domain_risks


@dataclass(frozen=True)
class GroupDROConfig:
    eta: float = setting(0.01, "step size of the per-domain weights' exponentiated-gradient update "
                         "(DomainBed's groupdro_eta)", check="nonnegative")


class DomainWeights(nn.Module):
    """GroupDRO's persistent state: q over the manifest's domains, uniform at the start."""

    def __init__(self, num_domains: int):
        super().__init__()
        self.register_buffer("q", torch.full((num_domains,), 1.0 / num_domains))


class GroupDRO(Method):
    name = "groupdro"
    summary = "GroupDRO: the loss weighted toward the worst source domains by weights kept across steps"
    Section = GroupDROConfig
    metrics = ("groupdro_max_weight",)
    grad_accum_refusal = ("its per-domain weights are updated from the losses of the whole batch of an "
                          "update; accumulated micro-batches would update them once each")

    @classmethod
    def sweep_space(cls, preset):
        return {"groupdro.eta": {"log_uniform": [1e-3, 1e-1]}}  # DomainBed: 10^U(-3, -1)

    def build_modules(self):
        return DomainWeights(self.context.num_domains)

    def objective(self, network, batch, draws):
        logits = network.head(network.featurize(batch))
        risks, counts = domain_risks(logits, batch.labels, batch.domains, self.context.num_domains,
                                     self.process_group)
        present = (counts > 0).to(risks.dtype)
        q = network.method.q * torch.exp(self.settings.eta * risks.detach() * present)
        q = q / q.sum()
        weights = q * present / (q * present).sum().clamp(min=torch.finfo(q.dtype).tiny)
        return StepOutput((weights * risks).sum(), logits, {"groupdro_max_weight": weights.max()},
                          state={"q": q})
