"""IRM: Invariant Risk Minimization (Arjovsky, Bottou, Gulrajani and Lopez-Paz, 2019), the IRMv1
penalty as DomainBed's ``IRM`` computes it.

    loss = 1/|D| sum_{a in D} R_a  +  lambda * 1/|D2| sum_{a in D2} g_a^even * g_a^odd

over the source domains D present in the step (D2: those with at least 2 samples), where R_a
is domain a's mean cross-entropy and g_a^even, g_a^odd are the gradients, with respect to a
dummy scale s at s = 1, of the mean cross-entropy of the logits s * f(x) over the even- and the
odd-indexed samples of domain a ([::2] and [1::2]): their product is DomainBed's unbiased
estimate of IRMv1's squared gradient norm ||grad_{s|s=1} R_a(s * f)||^2. lambda is 1 for the
first ``anneal_steps`` steps and ``penalty_weight`` after, with the optimizer's state reset at
the switch (rsc_dist/methods/penalty_anneal.py).

The gradient with respect to s has a closed form per sample, which is what is computed here
(no second autograd pass; the penalty's own gradient is the ordinary backward of it):

    d/ds CE(s z_i, y_i) at s = 1  =  sum_c softmax(z_i)_c z_ic  -  z_{i, y_i}

so g_a^half is the mean of that value over the half's samples.

EXACT under data parallelism: the halves are by index in the GLOBAL per-domain order (a sample's
position among its domain's samples of the whole step, from StepBatch.order, the same on any
number of ranks), and R_a, g_a^even and g_a^odd are means over the global batch, all in one
all-reduce with a gradient (rsc_dist.core.collectives): every rank computes the same loss, and
DDP's average gives the single-process gradient of the penalty.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rsc_dist.core.fields import setting
from rsc_dist.methods.base import StepOutput
from rsc_dist.methods.domain_statistics import at_least_float32, index_within_domain, mean_over_present
from rsc_dist.methods.global_batch import per_domain_means
from rsc_dist.methods.penalty_anneal import AnnealedPenaltyMethod


@dataclass(frozen=True)
class IRMConfig:
    penalty_weight: float = setting(100.0, "weight of the IRMv1 penalty from step anneal_steps on "
                                    "(DomainBed's irm_lambda); 1 before", check="nonnegative")
    anneal_steps: int = setting(500, "steps with penalty weight 1; the optimizer's state is reset at this step "
                                "(DomainBed's irm_penalty_anneal_iters)", check="nonnegative")


class IRM(AnnealedPenaltyMethod):
    name = "irm"
    summary = ("IRMv1: per-domain cross-entropy plus the gradient penalty of a dummy scale on the two halves "
               "of each domain's global batch")
    Section = IRMConfig
    metrics = ("irm_penalty",)

    def objective(self, network, batch, draws):
        logits = network.head(network.featurize(batch))
        num_domains = self.context.num_domains
        cross_entropy, scale_gradient = cross_entropy_and_scale_gradient(logits, batch.labels)
        half = index_within_domain(batch.order, batch.domains, self.process_group, self.context.capacity) % 2
        # One all-reduce for both: per domain and half the scale gradient's mean (groups 2a and
        # 2a + 1), per domain the cross-entropy's mean (groups 2K + a).
        means, counts = per_domain_means(torch.cat([scale_gradient, cross_entropy]),
                                         torch.cat([2 * batch.domains + half, 2 * num_domains + batch.domains]),
                                         3 * num_domains, self.process_group)
        even, odd = means[0:2 * num_domains:2], means[1:2 * num_domains:2]
        both_halves = torch.minimum(counts[0:2 * num_domains:2], counts[1:2 * num_domains:2])
        penalty = mean_over_present(even * odd, both_halves)
        risk = mean_over_present(means[2 * num_domains:], counts[2 * num_domains:])
        return StepOutput(risk + draws["penalty_weight"] * penalty, logits, {"irm_penalty": penalty.detach()})


def cross_entropy_and_scale_gradient(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample (in at least float32): CE(z_i, y_i) and d/ds CE(s z_i, y_i) at s = 1."""
    logits = at_least_float32(logits)
    log_probabilities = torch.log_softmax(logits, dim=1)
    cross_entropy = -log_probabilities.gather(1, labels[:, None])[:, 0]
    scale_gradient = (log_probabilities.exp() * logits).sum(dim=1) - logits.gather(1, labels[:, None])[:, 0]
    return cross_entropy, scale_gradient
