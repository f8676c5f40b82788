"""VREx: Variance Risk Extrapolation (Krueger et al., "Out-of-Distribution Generalization via Risk
Extrapolation (REx)", ICML 2021), as DomainBed's ``VREx`` computes it.

    loss = mean_a R_a  +  lambda * mean_a (R_a - mean_b R_b)^2

over the source domains a present in the step, where R_a is domain a's mean cross-entropy (the
variance is the population variance over domains, as DomainBed). lambda is 1 for the first
``anneal_steps`` steps and ``penalty_weight`` after, with the optimizer's state reset at the
switch (rsc_dist/methods/penalty_anneal.py).

EXACT under data parallelism: R_a are means over the GLOBAL batch (one all-reduce with a
gradient, rsc_dist.core.collectives), so every rank computes the same loss and DDP's average
gives the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

from rsc_dist.core.fields import setting
from rsc_dist.methods.base import StepOutput
from rsc_dist.methods.domain_statistics import domain_risks, mean_over_present
from rsc_dist.methods.penalty_anneal import AnnealedPenaltyMethod


@dataclass(frozen=True)
class VRExConfig:
    penalty_weight: float = setting(10.0, "weight of the variance of the per-domain risks from step anneal_steps "
                                    "on (DomainBed's vrex_lambda); 1 before", check="nonnegative")
    anneal_steps: int = setting(500, "steps with penalty weight 1; the optimizer's state is reset at this step "
                                "(DomainBed's vrex_penalty_anneal_iters)", check="nonnegative")


class VREx(AnnealedPenaltyMethod):
    name = "vrex"
    summary = "V-REx: the mean of the per-domain risks plus their variance over the source domains"
    Section = VRExConfig
    metrics = ("vrex_penalty",)

    def objective(self, network, batch, draws):
        logits = network.head(network.featurize(batch))
        risks, counts = domain_risks(logits, batch.labels, batch.domains, self.context.num_domains,
                                     self.process_group)
        mean = mean_over_present(risks, counts)
        penalty = mean_over_present((risks - mean).pow(2), counts)
        return StepOutput(mean + draws["penalty_weight"] * penalty, logits, {"vrex_penalty": penalty.detach()})
