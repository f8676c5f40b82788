"""DANN and CDANN (rsc_dist/methods/dann.py) against DomainBed's ``AbstractDANN.update`` written
out plainly, with its two Adam optimizers, on fixed per-domain batches: each step's objective,
the gradient each update steps with, and every weight (backbone, head, discriminator, class
embeddings) after 3 steps that alternate discriminator, generator, discriminator. The
discriminator's seeded dropout: nn.Dropout's definition, and a sample's mask independent of the
batch that holds it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import autograd, nn

from rsc_dist.core.errors import ConfigError
from rsc_dist.methods.base import MethodContext
from rsc_dist.methods.dann import CDANN, DANN, CDANNConfig, DANNConfig, seeded_dropout
from support.reference_updates import (CHANNELS, assert_same_parameters, method_network, per_domain_batches,
                                      step_batch, train_method)

NUM_DOMAINS, SOURCES, CLASSES, PER_DOMAIN = 4, (0, 2, 3), 5, 4  # domain 1 is the held-out target
LR_G, WEIGHT_DECAY_G = 1e-3, 1e-4
SETTINGS = dict(adversarial_weight=0.7, d_steps_per_g=2, grad_penalty=0.5, lr_d=2e-3, weight_decay_d=1e-3, beta1=0.5,
                mlp_width=16, mlp_depth=3)
# Step 0 leaves out the highest class (DomainBed's class balance then divides by max(y) + 1 = 4).
LABELS = (range(0, CLASSES - 1), range(0, CLASSES), range(0, CLASSES))


class DomainBedMLP(nn.Module):
    """networks.MLP with mlp_dropout 0: input, hidden and output linear layers, ReLU between."""

    def __init__(self, n_inputs, n_outputs, width, depth):
        super().__init__()
        self.input = nn.Linear(n_inputs, width)
        self.hiddens = nn.ModuleList([nn.Linear(width, width) for _ in range(depth - 2)])
        self.output = nn.Linear(width, n_outputs)

    def forward(self, x):
        x = F.relu(self.input(x))
        for hidden in self.hiddens:
            x = F.relu(hidden(x))
        return self.output(x)


class DomainBedDANN:
    """AbstractDANN: featurizer, classifier, discriminator, class embeddings, two Adam optimizers."""

    def __init__(self, start, conditional, class_balance):
        self.featurizer = copy.deepcopy(start.features)
        self.classifier = copy.deepcopy(start.head.fc)
        self.discriminator = DomainBedMLP(CHANNELS, len(SOURCES), SETTINGS["mlp_width"], SETTINGS["mlp_depth"])
        method = start.method
        self.discriminator.input.load_state_dict(method.layers[0].state_dict())
        for hidden, layer in zip(self.discriminator.hiddens, method.layers[1:]):
            hidden.load_state_dict(layer.state_dict())
        self.discriminator.output.load_state_dict(method.output.state_dict())
        self.class_embeddings = nn.Embedding(CLASSES, CHANNELS)
        if conditional:
            self.class_embeddings.load_state_dict(method.class_embeddings.state_dict())
        self.conditional, self.class_balance = conditional, class_balance
        betas = (SETTINGS["beta1"], 0.9)
        self.disc_opt = torch.optim.Adam(list(self.discriminator.parameters()) + list(self.class_embeddings.parameters()),
                                         lr=SETTINGS["lr_d"], weight_decay=SETTINGS["weight_decay_d"], betas=betas)
        self.gen_opt = torch.optim.Adam(list(self.featurizer.parameters()) + list(self.classifier.parameters()),
                                        lr=LR_G, weight_decay=WEIGHT_DECAY_G, betas=betas)
        self.update_count = 0

    def update(self, minibatches):
        """One update; returns its loss and the gradients of the optimizer it steps."""
        self.update_count += 1
        all_x = torch.cat([x for x, y in minibatches])
        all_y = torch.cat([y for x, y in minibatches])
        all_z = self.featurizer(all_x).mean(dim=(2, 3))
        disc_input = all_z + self.class_embeddings(all_y) if self.conditional else all_z
        disc_out = self.discriminator(disc_input)
        disc_labels = torch.cat([torch.full((x.shape[0],), i, dtype=torch.int64) for i, (x, y) in enumerate(minibatches)])
        if self.class_balance:
            y_counts = F.one_hot(all_y).sum(dim=0)
            weights = 1.0 / (y_counts[all_y] * y_counts.shape[0]).float()
            disc_loss = (weights * F.cross_entropy(disc_out, disc_labels, reduction="none")).sum()
        else:
            disc_loss = F.cross_entropy(disc_out, disc_labels)
        input_grad = autograd.grad(F.cross_entropy(disc_out, disc_labels, reduction="sum"), [disc_input],
                                   create_graph=True)[0]
        disc_loss = disc_loss + SETTINGS["grad_penalty"] * (input_grad ** 2).sum(dim=1).mean(dim=0)
        d_steps_per_g = SETTINGS["d_steps_per_g"]
        if self.update_count % (1 + d_steps_per_g) < d_steps_per_g:
            self.disc_opt.zero_grad()
            disc_loss.backward()
            return "discriminator", disc_loss.detach(), self._step(self.disc_opt)
        gen_loss = F.cross_entropy(self.classifier(all_z), all_y) + SETTINGS["adversarial_weight"] * -disc_loss
        self.disc_opt.zero_grad()
        self.gen_opt.zero_grad()
        gen_loss.backward()
        return "generator", gen_loss.detach(), self._step(self.gen_opt)

    @staticmethod
    def _step(optimizer):
        """[(parameter, its gradient)] of what the optimizer steps (DANN's unused class embeddings
        have none), then the step."""
        grads = [(p, p.grad.clone()) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        optimizer.step()
        return grads

    def named_parameters(self, conditional):
        """The reference's weights under the names the method's network gives them."""
        names = {f"features.{n}": p for n, p in self.featurizer.named_parameters()}
        names.update({f"head.fc.{n}": p for n, p in self.classifier.named_parameters()})
        layers = [self.discriminator.input, *self.discriminator.hiddens]
        for i, layer in enumerate(layers):
            names.update({f"method.layers.{i}.{n}": p for n, p in layer.named_parameters()})
        names.update({f"method.output.{n}": p for n, p in self.discriminator.output.named_parameters()})
        if conditional:
            names["method.class_embeddings.weight"] = self.class_embeddings.weight
        return names


@pytest.mark.parametrize("method_class, settings_class", [(DANN, DANNConfig), (CDANN, CDANNConfig)])
def test_three_steps_equal_domainbeds_update(method_class, settings_class):
    context = MethodContext(seed=5, num_classes=CLASSES, num_domains=NUM_DOMAINS, source_domains=SOURCES,
                            feature_dim=CHANNELS, optimizer="adam")
    method = method_class(settings_class(**SETTINGS), context)
    steps = [per_domain_batches(step, SOURCES, PER_DOMAIN, LABELS[step]) for step in range(3)]
    network, optimizer, start = method_network(method, CLASSES, LR_G, WEIGHT_DECAY_G)
    runners = train_method(method, network, optimizer, [step_batch(m, shuffle_seed=s)[0] for s, m in enumerate(steps)])

    reference = DomainBedDANN(start, method.conditional, method.class_balance)
    names = reference.named_parameters(method.conditional)
    kinds = []
    for minibatches, runner in zip(steps, runners):
        kind, loss, grads = reference.update([(m["x"], m["y"]) for m in minibatches])
        kinds.append(kind)
        torch.testing.assert_close(runner.loss, loss)
        expected = {name: grad for p, grad in grads for name, q in names.items() if q is p}
        assert len(runner.updates) == 1 and runner.updates[0].keys() == expected.keys()
        assert_same_parameters(runner.updates[0], expected)
    assert kinds == ["discriminator", "generator", "discriminator"]
    assert_same_parameters(network, names)
    assert dict(network.named_parameters()).keys() == names.keys()


def test_learning_rates_and_betas_of_the_two_players():
    context = MethodContext(num_classes=CLASSES, num_domains=NUM_DOMAINS, feature_dim=CHANNELS, optimizer="adam")
    network, _, _ = method_network(DANN(DANNConfig(), context), CLASSES, LR_G, WEIGHT_DECAY_G)
    groups = {g.name: g.settings for g in DANN(DANNConfig(), context).parameter_groups(network)}
    # lr_d unset: the discriminator follows optim.lr, as DomainBed's lr_d default equals its lr_g.
    assert groups == {"generator": {"betas": (0.5, 0.9)}, "discriminator": {"weight_decay": 0.0, "betas": (0.5, 0.9)}}
    sgd = DANN(DANNConfig(lr_d=0.3), MethodContext(num_classes=CLASSES, num_domains=NUM_DOMAINS, feature_dim=CHANNELS))
    assert {g.name: g.settings for g in sgd.parameter_groups(network)}["discriminator"] == {"weight_decay": 0.0,
                                                                                             "lr": 0.3}
    for bad, message in (({"mlp_depth": 1}, "dann.mlp_depth=1"), ({"beta1": 1.0}, "dann.beta1=1.0"),
                         ({"mlp_dropout": 1.0}, "dann.mlp_dropout=1.0")):
        with pytest.raises(ConfigError, match=message):
            DANN(DANNConfig(**bad), context)


def test_seeded_dropout_is_dropout_and_each_sample_keeps_its_mask():
    p = 0.3
    seeds = torch.arange(4000, dtype=torch.int64) * 7919 + 11
    x = torch.ones(4000, 64)
    out = seeded_dropout(x, seeds, p, salt=1)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / (1 - p)))
    # A sample's mask comes from its seed alone: a part of the batch draws the same rows.
    torch.testing.assert_close(seeded_dropout(x[1000:1010], seeds[1000:1010], p, salt=1), out[1000:1010])
    assert not torch.equal(seeded_dropout(x, seeds, p, salt=2), out)  # another layer: another mask
