"""SagNet: style-agnostic networks (Nam et al., CVPR 2021, arXiv:1910.11645, Algorithm 1) as
DomainBed runs it (``SagNet``).

Features are split into "content" (the normalized feature vector) and "style" (its mean and
variance). Statistics are taken where DomainBed takes them, on the featurizer's output: the
pooled feature vector f (N, d), z averaged over its locations, with the mean mu(f) and the
(unbiased) variance sigma^2(f) over its d entries, one pair per sample:

    f^ = (f - mu(f)) / sqrt(sigma^2(f) + eps)                              (eps = 1e-5)
    style randomization (SR):    SR(f, f')  = f^ * sqrt(s2~ + eps) + mu~,
        mu~ = a mu(f) + (1 - a) mu(f'),  s2~ = a sigma^2(f) + (1 - a) sigma^2(f'),  a ~ U(0, 1)
    content randomization (CR):  CR(f, f')  = stop_grad(f'^) * sqrt(sigma^2(f) + eps) + mu(f)

where f' is the swap partner: the sample at place pi(i) of the step's batch for a random
permutation pi. (The paper randomizes channel statistics over the locations of an intermediate
feature map, with separate last stages for the content and style networks; DomainBed's
default, followed here, keeps one featurizer and randomizes the pooled vector.)

Three updates in sequence per step, each with its own optimizer state (DomainBed's three Adam
optimizers are three parameter groups of the run's one optimizer, each stepped only in its
updates):
    1. content:     minimize CE(h(SR(f, f')), y)          over the featurizer and the head h
    2. style:       minimize CE(g(CR(f, f')), y)          over the style head g
    3. adversarial: minimize -w * mean_i mean_c log softmax(g(CR(f, f')))_c   over the featurizer
with a fresh permutation for each update, and f recomputed by the featurizer after update 1.
The content head is the model's head: evaluation is h(features) as for every method; the style
head g (a linear layer, network.method) takes no part in prediction.

EXACT under data parallelism: pi permutes the GLOBAL batch (places of StepBatch.order) and is a
pure function of (seed, step, update); a partner on another rank is gathered
(methods.global_batch.in_global_order): in SR its mean and variance, with their gradient (one
all-gather of 2 values per sample and one all-reduce in the backward), in CR its normalized
vector, without. The a_i are drawn from each sample's identity. Update 2 needs no gradient
through the featurizer (DomainBed computes one and discards it): its features carry no graph,
and featurizer and head join that update's DDP gradient exchange with zero weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsc_dist.core.collectives import world_size
from rsc_dist.core.errors import ConfigError
from rsc_dist.core.fields import setting
from rsc_dist.core.seeding import hashed_uniform, mix_seed
from rsc_dist.methods.base import Method, ParamGroup, StepOutput, unused_parameters_term
from rsc_dist.methods.domain_statistics import pooled_features
from rsc_dist.methods.global_batch import in_global_order, local_rows
from rsc_dist.models.heads import PooledLinearHead, PooledNormHead

EPS = 1e-5  # DomainBed's randomize(eps=1e-5)
_DRAW_SALT = 0x5341474E  # separates SagNet's draws from other seeded draws of the same (seed, step)
# Heads that start with global average pooling: they map the pooled vector (as a 1 x 1 map) to
# the same logits as the feature map it came from.
POOLED_HEADS = (PooledLinearHead, PooledNormHead)


@dataclass(frozen=True)
class SagNetConfig:
    adversarial_weight: float = setting(
        0.1, "weight w of the adversarial style loss that trains the featurizer against the style head "
        "(DomainBed's sag_w_adv)", check="nonnegative")


class SagNet(Method):
    name = "sagnet"
    summary = ("style-agnostic networks (SagNet, DomainBed): content and style randomization of the pooled "
               "features with swap partners from the global batch, three updates per step; exact on any "
               "number of ranks")
    Section = SagNetConfig
    metrics = ("content_loss", "style_loss", "adversarial_loss")
    zero_refusal = ("its three updates per step each step another parameter group (featurizer and head, "
                    "style head, featurizer), which DeepSpeed's ZeRO optimizer cannot do")
    grad_accum_refusal = "it runs three updates per step, each stepping another parameter group"

    @classmethod
    def sweep_space(cls, preset):
        return {"sagnet.adversarial_weight": {"log_uniform": [1e-2, 10.0]}}  # DomainBed: 10^U(-2, 1)

    def draws(self, step, steps_per_epoch, sample_ids):
        """Each sample's style weight a (from its identity) and the seeds of the step's three
        permutations of the global batch."""
        if sample_ids is None:
            raise ValueError("sagnet needs each sample's identity (the batch has no sample_id)")
        seed = self.context.seed
        return {"style_weight": hashed_uniform(sample_ids ^ mix_seed(seed, step, _DRAW_SALT), 1)[:, 0],
                "swap_seeds": tuple(mix_seed(seed, step, _DRAW_SALT, update) for update in range(3))}

    def train_step(self, runner, batch, draws):
        content = runner.forward(self.content_objective, batch, draws)
        runner.backward(content.loss)
        runner.optimizer_step(("featurizer", "content"))
        style = runner.forward(self.style_objective, batch, draws)
        runner.backward(style.loss)
        runner.optimizer_step(("style",))
        adversarial = runner.forward(self.adversarial_objective, batch, draws)
        runner.backward(adversarial.loss)
        runner.optimizer_step(("featurizer",))
        content.metrics.update(style.metrics)
        content.metrics.update(adversarial.metrics)
        return content

    # -- the three updates ----------------------------------------------------------------------

    def content_objective(self, network, batch, draws) -> StepOutput:
        features = pooled_features(network.featurize(batch)).float()
        partners = self.permutation(draws["swap_seeds"][0], batch)
        logits = network.head(as_map(self.randomize_style(features, batch, draws["style_weight"], partners)))
        loss = F.cross_entropy(logits.float(), batch.labels)
        return StepOutput(loss + unused_parameters_term(network.method), logits, {"content_loss": loss.detach()})

    def style_objective(self, network, batch, draws) -> StepOutput:
        with torch.no_grad():  # this update steps the style head only
            features = pooled_features(network.featurize(batch)).float()
        partners = self.permutation(draws["swap_seeds"][1], batch)
        logits = network.method["style_head"](self.randomize_content(features, batch, partners))
        loss = F.cross_entropy(logits.float(), batch.labels)
        return StepOutput(loss + unused_parameters_term(network.features, network.head),
                          metrics={"style_loss": loss.detach()})

    def adversarial_objective(self, network, batch, draws) -> StepOutput:
        features = pooled_features(network.featurize(batch)).float()
        partners = self.permutation(draws["swap_seeds"][2], batch)
        logits = network.method["style_head"](self.randomize_content(features, batch, partners))
        loss = -self.settings.adversarial_weight * F.log_softmax(logits.float(), dim=1).mean(dim=1).mean()
        return StepOutput(loss + unused_parameters_term(network.head), metrics={"adversarial_loss": loss.detach()})

    # -- randomization over the global batch ----------------------------------------------------

    def permutation(self, seed: int, batch) -> Tensor:
        """pi over the places of the global batch (every rank holds as many rows in a step)."""
        size = batch.labels.shape[0] * world_size(self.process_group)
        return swap_permutation(seed, size).to(batch.labels.device, non_blocking=True)

    def randomize_style(self, features: Tensor, batch, style_weight: Tensor, permutation: Tensor) -> Tensor:
        """SR(f, f'): each sample's normalized vector with its statistics mixed with its partner's."""
        mean, variance = features.mean(dim=1, keepdim=True), features.var(dim=1, keepdim=True)
        normalized = (features - mean) / (variance + EPS).sqrt()
        statistics = swapped(torch.cat([mean, variance], dim=1), batch.order, permutation, self.process_group,
                             differentiable=True)
        weight = style_weight.to(features.dtype)[:, None]
        mean = weight * mean + (1 - weight) * statistics[:, :1]
        variance = weight * variance + (1 - weight) * statistics[:, 1:]
        return normalized * (variance + EPS).sqrt() + mean

    def randomize_content(self, features: Tensor, batch, permutation: Tensor) -> Tensor:
        """CR(f, f'): the partner's normalized vector (no gradient) with the sample's own statistics."""
        mean, variance = features.mean(dim=1, keepdim=True), features.var(dim=1, keepdim=True)
        normalized = (features - mean) / (variance + EPS).sqrt()
        partner = swapped(normalized.detach(), batch.order, permutation, self.process_group)
        return partner * (variance + EPS).sqrt() + mean

    # -- its own parameters ---------------------------------------------------------------------

    def build_modules(self):
        return nn.ModuleDict({"style_head": nn.Linear(self.context.feature_dim, self.context.num_classes)})

    def parameter_groups(self, network):
        if not isinstance(network.head, POOLED_HEADS):
            raise ConfigError(f"algorithm=sagnet randomizes the pooled feature vector and needs a head that "
                              f"starts with global average pooling; this model.arch's head "
                              f"({type(network.head).__name__}) reads the feature map")

        def trainable(module):
            return [p for p in module.parameters() if p.requires_grad]

        return [ParamGroup("featurizer", trainable(network.features)), ParamGroup("content", trainable(network.head)),
                ParamGroup("style", trainable(network.method))]


def swap_permutation(seed: int, size: int) -> Tensor:
    """A random permutation of ``size`` places from ``seed`` alone (on the CPU)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))


def swapped(rows: Tensor, order: Tensor, permutation: Tensor, group=None, *, differentiable: bool = False) -> Tensor:
    """For each local row, the row of its partner: the row at place ``permutation[p]`` of the
    global batch, p the local row's own place (gathered from the rank that holds it)."""
    everything = in_global_order(rows, order, group, differentiable=differentiable)
    return everything[permutation[local_rows(order, group)]]


def as_map(vectors: Tensor) -> Tensor:
    """(N, d) -> (N, d, 1, 1): a pooled vector as the feature map a pooling head reads."""
    return vectors[:, :, None, None]
