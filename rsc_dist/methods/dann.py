"""DANN and CDANN: domain-adversarial training as DomainBed runs it (``AbstractDANN``; Ganin et
al., JMLR 2016 for DANN; Li et al., ECCV 2018 for the class-conditional CDANN).

A discriminator D (an MLP on the pooled features f = z averaged over its locations; CDANN adds
a learned embedding of the class, D(f + e_y)) learns to tell the training domains apart, and
the generator (backbone and head) learns to classify while making that hard. The steps
alternate: with u = step + 1 (DomainBed counts its updates from 1) and k = d_steps_per_g,
step u updates the discriminator when u mod (k + 1) < k, else the generator:

    L_D = CE(D(f), d)  [CDANN: sum_i w_i CE_i, w_i = 1 / (n_{y_i} * (max_j y_j + 1))]
          + gamma * mean_i || d CE_i / d D-input_i ||^2                  (the gradient penalty)
    discriminator step:  minimize L_D over D (and e)            (the inner max of Ganin et al.'s saddle point)
    generator step:      minimize CE(h(z), y) - lambda * L_D over backbone and head   (its outer min)

with d the sample's training-domain index, n_c the number of samples of class c in the step's
batch (DomainBed's class balance: F.one_hot(all_y) has max(y) + 1 columns, which is the number
of classes when the highest class is in the batch; kept as DomainBed computes it). Each player
has its own optimizer settings: DomainBed's Adam with betas (beta1, 0.9) for both, lr_d and
weight_decay_d for D; DomainBed's lr_g and weight_decay_g are optim.lr and optim.weight_decay.

Here the two players are two parameter groups of the run's one optimizer; a step steps only its
player's group (Runner.optimizer_step), which is what DomainBed's two optimizers do (each player
sees only the gradient of its own update). The discriminator step needs no gradient through the
backbone (DomainBed computes one and throws it away), so the features are computed without a
graph; the backbone and head take part in that step's DDP gradient exchange with zero weight
(methods.base.unused_parameters_term).

EXACT under data parallelism: the alternation is a function of the step; the cross-entropy and
the penalty are means over each rank's samples (DDP's average makes them means over the global
batch); CDANN's class counts are summed over ranks (one all-reduce) and its weighted sum is
summed over ranks with a gradient (methods.global_batch's rule: every rank computes the global
loss); dropout in D (mlp_dropout) draws each sample's mask from its identity and the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsc_dist.core.collectives import all_reduce_sum
from rsc_dist.core.errors import ConfigError
from rsc_dist.core.fields import setting
from rsc_dist.core.seeding import hashed_uniform, mix_seed
from rsc_dist.methods.base import Method, ParamGroup, StepOutput, unused_parameters_term
from rsc_dist.methods.domain_statistics import pooled_features

_DROPOUT_SALT = 0x44414E4E  # separates the discriminator's dropout draws from other seeded draws
_ADAM_BETA2 = 0.9  # DomainBed's betas are (beta1, 0.9) for both players


@dataclass(frozen=True)
class DANNConfig:
    adversarial_weight: float = setting(
        1.0, "DomainBed's lambda: the generator minimizes the class loss minus this times the "
        "discriminator's loss", check="nonnegative")
    d_steps_per_g: int = setting(
        1, "discriminator steps per generator step (DomainBed's d_steps_per_g_step; 0: generator only)",
        check="nonnegative")
    grad_penalty: float = setting(
        0.0, "weight of the penalty on the squared gradient of the discriminator's cross-entropy "
        "with respect to its input", check="nonnegative")
    lr_d: float | None = setting(
        None, "the discriminator's learning rate; None: optim.lr (DomainBed's lr_d, whose default "
        "equals its lr_g; DomainBed's lr_g is optim.lr here)", check="nonnegative")
    weight_decay_d: float = setting(
        0.0, "the discriminator's weight decay (DomainBed's weight_decay_d; weight_decay_g is "
        "optim.weight_decay)", check="nonnegative")
    beta1: float = setting(
        0.5, "with optim.name=adam: both players' betas are (beta1, 0.9) as in DomainBed, in place of "
        "optim.betas; with sgd both use optim.momentum and beta1 is not read", check="fraction")
    mlp_width: int = setting(256, "width of the discriminator MLP's hidden layers", check="positive")
    mlp_depth: int = setting(3, "linear layers of the discriminator MLP (at least 2)", check="positive")
    mlp_dropout: float = setting(
        0.0, "dropout after each hidden layer of the discriminator (each sample's mask drawn from its "
        "identity and the step; below 1)", check="fraction")


@dataclass(frozen=True)
class CDANNConfig(DANNConfig):
    """CDANN's settings: DANN's (DomainBed defines them for both)."""


class DANN(Method):
    name = "dann"
    summary = ("domain-adversarial training (DANN, DomainBed): a domain discriminator on the pooled "
               "features, alternating discriminator and generator steps; exact on any number of ranks")
    Section = DANNConfig
    metrics = ("class_loss", "disc_loss")
    zero_refusal = ("its discriminator and its generator (backbone and head) are updated in alternate "
                    "steps, each stepping only its own parameter group, which DeepSpeed's ZeRO optimizer cannot do")
    grad_accum_refusal = ("its steps alternate between the discriminator and the generator by step "
                          "number; counting accumulated updates instead is not implemented")
    conditional = False  # CDANN: the discriminator sees f + e_y
    class_balance = False  # CDANN: the discriminator's cross-entropy weighted by inverse class frequency

    def __init__(self, settings: DANNConfig | None = None, context=None):
        super().__init__(settings, context)
        if self.settings.mlp_depth < 2:
            raise ConfigError(f"{self.name}.mlp_depth={self.settings.mlp_depth}: the discriminator MLP has an "
                              "input and an output layer, so at least 2")
        if self.settings.mlp_dropout >= 1:
            raise ConfigError(f"{self.name}.mlp_dropout={self.settings.mlp_dropout}: must be below 1")
        if self.settings.beta1 >= 1:
            raise ConfigError(f"{self.name}.beta1={self.settings.beta1}: Adam's beta1 must be below 1")

    @classmethod
    def sweep_space(cls, preset):
        # DomainBed's distributions; lr_d scaled to the preset like optim.lr (rsc_dist.sweep.space),
        # where DomainBed draws 10^U(-5, -3.5) around its Adam default of 5e-5.
        lr = float(preset["optim.lr"])
        return {f"{cls.name}.adversarial_weight": {"log_uniform": [1e-2, 1e2]},  # 10^U(-2, 2)
                f"{cls.name}.weight_decay_d": {"log_uniform": [1e-6, 1e-2]},  # 10^U(-6, -2)
                f"{cls.name}.d_steps_per_g": {"int_log_uniform": [1, 8]},  # int(2^U(0, 3))
                f"{cls.name}.grad_penalty": {"log_uniform": [1e-2, 10.0]},  # 10^U(-2, 1)
                f"{cls.name}.beta1": {"choice": [0.0, 0.5]},
                f"{cls.name}.mlp_width": {"int_log_uniform": [64, 1024]},  # int(2^U(6, 10))
                f"{cls.name}.mlp_depth": {"choice": [3, 4, 5]},
                f"{cls.name}.mlp_dropout": {"choice": [0.0, 0.1, 0.5]},
                f"{cls.name}.lr_d": {"log_uniform": [lr / 5, lr * 5]}}

    # -- per step -------------------------------------------------------------------------------

    def update_kind(self, step: int) -> str:
        """"discriminator" or "generator": DomainBed's rule on its update count (step + 1)."""
        steps = self.settings.d_steps_per_g
        return "discriminator" if (step + 1) % (steps + 1) < steps else "generator"

    def draws(self, step, steps_per_epoch, sample_ids):
        draws = {"update": self.update_kind(step)}
        if self.settings.mlp_dropout > 0:
            if sample_ids is None:
                raise ValueError(f"{self.name}.mlp_dropout needs each sample's identity (the batch has no sample_id)")
            draws["dropout_seeds"] = sample_ids ^ mix_seed(self.context.seed, step, _DROPOUT_SALT)
        return draws

    def train_step(self, runner, batch, draws):
        if draws["update"] == "discriminator":
            objective, group = self.discriminator_objective, "discriminator"
        else:
            objective, group = self.generator_objective, "generator"
        out = runner.forward(objective, batch, draws)
        runner.backward(out.loss)
        runner.optimizer_step((group,))
        return out

    def discriminator_objective(self, network, batch, draws) -> StepOutput:
        # The discriminator's step changes D (and e) only: the features carry no graph.
        with torch.no_grad():
            z = network.featurize(batch)
            logits = network.head(z)
            class_loss = F.cross_entropy(logits.float(), batch.labels)
        disc_loss = self.discriminator_loss(network.method, pooled_features(z, network.head), batch, draws)
        loss = disc_loss + unused_parameters_term(network.features, network.head)
        return StepOutput(loss, logits, {"class_loss": class_loss, "disc_loss": disc_loss.detach()})

    def generator_objective(self, network, batch, draws) -> StepOutput:
        z = network.featurize(batch)
        logits = network.head(z)
        class_loss = F.cross_entropy(logits.float(), batch.labels)
        disc_loss = self.discriminator_loss(network.method, pooled_features(z, network.head), batch, draws)
        loss = class_loss - self.settings.adversarial_weight * disc_loss
        return StepOutput(loss, logits, {"class_loss": class_loss.detach(), "disc_loss": disc_loss.detach()})

    def discriminator_loss(self, discriminator: "Discriminator", features: Tensor, batch, draws) -> Tensor:
        """L_D of the module docstring on this rank's samples, the global value where the batch
        enters (CDANN's class counts)."""
        if batch.domains is None:
            raise ValueError(f"{self.name} needs each training sample's domain (the batch has no 'domain')")
        disc_input = features
        if self.conditional:
            disc_input = disc_input + discriminator.class_embeddings(batch.labels)
        penalty_weight = self.settings.grad_penalty
        if penalty_weight > 0 and not disc_input.requires_grad:
            disc_input = disc_input.detach().requires_grad_()
        outputs = discriminator(disc_input, draws.get("dropout_seeds")).float()
        per_sample = F.cross_entropy(outputs, discriminator.domain_label[batch.domains], reduction="none")
        if self.class_balance:
            loss = class_balanced_sum(per_sample, batch.labels, self.context.num_classes, self.process_group)
        else:
            loss = per_sample.mean()
        if penalty_weight > 0:
            # DomainBed: the gradient of the unweighted summed cross-entropy with respect to D's input.
            (input_grad,) = torch.autograd.grad(per_sample.sum(), disc_input, create_graph=True)
            loss = loss + penalty_weight * input_grad.float().pow(2).sum(dim=1).mean()
        return loss

    # -- its own parameters ---------------------------------------------------------------------

    def build_modules(self):
        context = self.context
        sources = context.source_domains or tuple(range(context.num_domains))
        domain_label = torch.full((context.num_domains,), -1, dtype=torch.long)  # targets: never a label
        domain_label[list(sources)] = torch.arange(len(sources))
        return Discriminator(context.feature_dim, len(sources), self.settings, domain_label,
                             num_classes=context.num_classes if self.conditional else 0)

    def parameter_groups(self, network):
        settings = self.settings
        generator = [p for name, p in network.named_parameters() if not name.startswith("method.") and p.requires_grad]
        generator_settings, discriminator_settings = {}, {"weight_decay": settings.weight_decay_d}
        if settings.lr_d is not None:
            discriminator_settings["lr"] = settings.lr_d
        if self.context.optimizer == "adam":
            generator_settings["betas"] = discriminator_settings["betas"] = (settings.beta1, _ADAM_BETA2)
        return [ParamGroup("generator", generator, generator_settings),
                ParamGroup("discriminator", list(network.method.parameters()), discriminator_settings)]


class CDANN(DANN):
    name = "cdann"
    summary = ("class-conditional DANN (DomainBed): the discriminator sees the features plus a class "
               "embedding, its loss class-balanced; exact on any number of ranks")
    Section = CDANNConfig
    conditional = True
    class_balance = True


class Discriminator(nn.Module):
    """DomainBed's ``networks.MLP``: linear, dropout, ReLU for each of depth - 1 layers, then a
    linear layer to one logit per training domain; with CDANN the class embeddings e_y (the
    size of the features) that DomainBed keeps beside it in the discriminator's optimizer."""

    def __init__(self, in_features: int, num_outputs: int, settings: DANNConfig, domain_label: Tensor,
                 num_classes: int = 0):
        super().__init__()
        width = settings.mlp_width
        self.layers = nn.ModuleList([nn.Linear(in_features, width)]
                                    + [nn.Linear(width, width) for _ in range(settings.mlp_depth - 2)])
        self.output = nn.Linear(width, num_outputs)
        self.dropout = settings.mlp_dropout
        self.class_embeddings = nn.Embedding(num_classes, in_features) if num_classes else None
        # Manifest domain index -> the discriminator's label (the index among the training domains).
        self.register_buffer("domain_label", domain_label, persistent=False)

    def forward(self, x: Tensor, dropout_seeds: Tensor | None = None) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if self.dropout > 0:
                x = seeded_dropout(x, dropout_seeds, self.dropout, salt=index)
            x = F.relu(x)
        return self.output(x)


def seeded_dropout(x: Tensor, seeds: Tensor, p: float, salt: int) -> Tensor:
    """Dropout (each value zeroed with probability p, the rest scaled by 1 / (1 - p), as
    nn.Dropout) whose mask for row i is drawn from ``seeds[i]`` and ``salt``: a sample's mask does
    not depend on which rank or batch holds it."""
    if seeds is None:
        raise ValueError("seeded dropout needs each sample's seed")
    keep = hashed_uniform(seeds, x.shape[1], salt=salt) >= p
    return x * keep.to(x.dtype) / (1 - p)


def class_balanced_sum(per_sample: Tensor, labels: Tensor, num_classes: int, group=None) -> Tensor:
    """DomainBed's class-balanced discriminator loss over the global batch:
    sum_i CE_i / (n_{y_i} * (max_j y_j + 1)), n_c the number of samples of class c in the batch of
    all ranks. Every rank returns the global sum (its gradient reaches each rank's own rows,
    times the number of ranks, which DDP's average undoes)."""
    local_counts = per_sample.new_zeros(num_classes).index_add(0, labels, torch.ones_like(per_sample))
    counts = all_reduce_sum(local_counts.detach(), group)
    # F.one_hot(all_y) in DomainBed: max(y) + 1 columns, the highest class present plus one.
    columns = (torch.arange(1, num_classes + 1, device=labels.device, dtype=per_sample.dtype) * (counts > 0)).max()
    weights = 1.0 / (counts[labels] * columns)
    return all_reduce_sum((weights * per_sample).sum(), group, differentiable=True)
