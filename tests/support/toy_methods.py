"""Three small methods that exercise the hooks the built-in methods do not all use, registered
for the tests (conftest sets RSC_DIST_METHOD_MODULES=support.toy_methods, so every process of a
test run, launched ranks included, has them). The generic suite runs over them like over any
registered method.

- ``toy_contrast``: transforms the INPUTS before the backbone, with per-sample draws from each
  sample's identity (each image's contrast lowered by its own factor).
- ``toy_state``: PERSISTENT STATE (a per-domain level, a buffer, updated every step from the
  per-domain losses of the global batch) and an optimizer reset at a fixed step.
- ``toy_adversary``: PARAMETERS OF ITS OWN (a domain critic on the pooled features, in its own
  parameter group with its own learning rate) and a SECOND UPDATE in each step: the model
  update (cross-entropy minus the critic's loss), then the critic's update on the features the
  model had at the start of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rsc_dist.core.fields import setting
from rsc_dist.core.seeding import hashed_uniform, mix_seed
from rsc_dist.methods import register
from rsc_dist.methods.base import Method, ParamGroup, StepOutput, unused_parameters_term
from rsc_dist.methods.global_batch import per_domain_means


@register
class ToyContrast(Method):
    name = "toy_contrast"
    summary = "(tests) inputs: each image's contrast lowered by a factor drawn from its identity"
    metrics = ("mean_factor",)

    def draws(self, step, steps_per_epoch, sample_ids):
        if sample_ids is None:
            raise ValueError("toy_contrast needs each sample's identity")
        return {"factor": 0.5 * hashed_uniform(sample_ids ^ mix_seed(self.context.seed, step), 1)[:, 0]}

    def transform_inputs(self, batch, draws):
        factor = draws["factor"].to(batch.images.dtype)[:, None, None, None]
        mean = batch.images.mean(dim=(1, 2, 3), keepdim=True)
        return batch.replace(images=batch.images * (1 - factor) + factor * mean,
                             extras={**batch.extras, "factor": draws["factor"]})

    def loss(self, logits, batch, extras):
        loss, _ = super().loss(logits, batch, extras)
        return loss, {"mean_factor": batch.extras["factor"].mean()}


@dataclass(frozen=True)
class ToyStateConfig:
    rate: float = setting(0.5, "how fast the per-domain level follows the per-domain loss", check="fraction")
    reset_step: int = setting(2, "the step at which the optimizer state is reset (as IRM's anneal step)",
                              check="nonnegative")


class _Levels(nn.Module):
    def __init__(self, num_domains: int):
        super().__init__()
        self.register_buffer("level", torch.zeros(num_domains))


@register
class ToyState(Method):
    name = "toy_state"
    summary = "(tests) state: per-domain levels kept across steps weight the per-domain losses; an optimizer reset"
    Section = ToyStateConfig
    metrics = ("top_level",)

    def build_modules(self):
        return _Levels(self.context.num_domains)

    def objective(self, network, batch, draws):
        logits = network.head(network.featurize(batch))
        per_sample = F.cross_entropy(logits.float(), batch.labels, reduction="none")
        means, counts = per_domain_means(per_sample, batch.domains, self.context.num_domains, self.process_group)
        present = (counts > 0).float()
        level = network.method.level
        weights = torch.softmax(level.masked_fill(present == 0, -1e9), dim=0) * present
        rate = self.settings.rate
        new_level = torch.where(present > 0, (1 - rate) * level + rate * means.detach(), level)
        return StepOutput((weights * means).sum(), logits, {"top_level": new_level.max()},
                          state={"level": new_level})

    def train_step(self, runner, batch, draws):
        if runner.step == self.settings.reset_step:
            runner.reset_optimizer_state()
        return super().train_step(runner, batch, draws)


@dataclass(frozen=True)
class ToyAdversaryConfig:
    weight: float = setting(0.1, "weight of the critic's loss subtracted from the model's", check="nonnegative")
    critic_lr: float = setting(0.05, "the critic's learning rate (its own parameter group)", check="nonnegative")


@register
class ToyAdversary(Method):
    name = "toy_adversary"
    summary = "(tests) own parameters and a second update per step: a domain critic trained after the model"
    Section = ToyAdversaryConfig
    metrics = ("critic_loss",)
    zero_refusal = "its critic is updated apart from the model in every step, which ZeRO cannot step alone"
    grad_accum_refusal = "it runs two updates per step"

    def build_modules(self):
        return nn.ModuleDict({"critic": nn.Linear(self.context.feature_dim, self.context.num_domains)})

    def parameter_groups(self, network):
        model = [p for name, p in network.named_parameters() if not name.startswith("method.")]
        return [ParamGroup("model", model),
                ParamGroup("critic", list(network.method.parameters()), {"lr": self.settings.critic_lr})]

    def model_objective(self, network, batch, draws):
        z = network.featurize(batch)
        pooled = z.mean(dim=(2, 3))
        logits = network.head(z)
        critic_loss = F.cross_entropy(network.method["critic"](pooled).float(), batch.domains)
        loss = F.cross_entropy(logits.float(), batch.labels) - self.settings.weight * critic_loss
        return StepOutput(loss, logits, {"critic_loss": critic_loss.detach()}, extras={"pooled": pooled.detach()})

    def critic_objective(self, network, batch, draws, pooled):
        loss = F.cross_entropy(network.method["critic"](pooled).float(), batch.domains)
        return StepOutput(loss + unused_parameters_term(network.features, network.head))

    def train_step(self, runner, batch, draws):
        out = runner.forward(self.model_objective, batch, draws)
        runner.backward(out.loss)
        runner.optimizer_step(("model",))
        critic = runner.forward(lambda network, batch, draws: self.critic_objective(
            network, batch, draws, out.extras["pooled"]), batch, draws)
        runner.backward(critic.loss)
        runner.optimizer_step(("critic",))
        return out

