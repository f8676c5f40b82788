"""SagNet (rsc_dist/methods/sagnet.py) against DomainBed's ``SagNet`` written out plainly, with its
three Adam optimizers, on a fixed batch: the three losses of each step, the gradient each update
steps with, and every weight (featurizer, content head, style head) after 3 steps. The swap
partners are places of the global batch: the method sees the batch's rows shuffled."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rsc_dist.core.errors import ConfigError
from rsc_dist.methods.base import MethodContext
from rsc_dist.methods.sagnet import SagNet, SagNetConfig, swap_permutation
from rsc_dist.models.network import Network
from support.reference_updates import (CHANNELS, assert_same_parameters, method_network, per_domain_batches,
                                      step_batch, train_method)

SOURCES, CLASSES, PER_DOMAIN = (0, 1, 2), 5, 4
LR, WEIGHT_DECAY, ADVERSARIAL_WEIGHT = 1e-3, 1e-4, 0.3


class DomainBedSagNet:
    """SagNet with networks f (featurizer + pooling), c and s (linear), one Adam optimizer each,
    and randomize() taking its randomness (alpha, idx_swap) as arguments."""

    def __init__(self, start):
        self.network_f = copy.deepcopy(start.features)
        self.network_c = copy.deepcopy(start.head.fc)
        self.network_s = copy.deepcopy(start.method["style_head"])

        def opt(module):
            return torch.optim.Adam(module.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

        self.optimizer_f, self.optimizer_c, self.optimizer_s = opt(self.network_f), opt(self.network_c), opt(self.network_s)

    def featurize(self, x):
        return self.network_f(x).mean(dim=(2, 3))

    @staticmethod
    def randomize(x, what, alpha, idx_swap, eps=1e-5):
        alpha = alpha[:, None]
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True)
        x = (x - mean) / (var + eps).sqrt()
        if what == "style":
            mean = alpha * mean + (1 - alpha) * mean[idx_swap]
            var = alpha * var + (1 - alpha) * var[idx_swap]
        else:
            x = x[idx_swap].detach()
        return x * (var + eps).sqrt() + mean

    def update(self, all_x, all_y, alpha, swaps):
        """One step; the three losses and the gradients of each of the three updates."""
        grads = []
        self.optimizer_f.zero_grad()
        self.optimizer_c.zero_grad()
        loss_c = F.cross_entropy(self.network_c(self.randomize(self.featurize(all_x), "style", alpha, swaps[0])), all_y)
        loss_c.backward()
        grads.append(self._grads(self.network_f, self.network_c))
        self.optimizer_f.step()
        self.optimizer_c.step()

        self.optimizer_s.zero_grad()
        loss_s = F.cross_entropy(self.network_s(self.randomize(self.featurize(all_x), "content", alpha, swaps[1])),
                                 all_y)
        loss_s.backward()
        grads.append(self._grads(self.network_s))
        self.optimizer_s.step()

        self.optimizer_f.zero_grad()
        style_logits = self.network_s(self.randomize(self.featurize(all_x), "content", alpha, swaps[2]))
        loss_adv = -F.log_softmax(style_logits, dim=1).mean(1).mean() * ADVERSARIAL_WEIGHT
        loss_adv.backward()
        grads.append(self._grads(self.network_f))
        self.optimizer_f.step()
        return (loss_c.detach(), loss_s.detach(), loss_adv.detach()), grads

    def _grads(self, *modules):
        return [(p, p.grad.clone()) for module in modules for p in module.parameters()]

    def named_parameters(self):
        """The reference's weights under the names the method's network gives them."""
        names = {f"features.{n}": p for n, p in self.network_f.named_parameters()}
        names.update({f"head.fc.{n}": p for n, p in self.network_c.named_parameters()})
        names.update({f"method.style_head.{n}": p for n, p in self.network_s.named_parameters()})
        return names


def test_three_steps_equal_domainbeds_sagnet():
    method = SagNet(SagNetConfig(adversarial_weight=ADVERSARIAL_WEIGHT),
                    MethodContext(seed=3, num_classes=CLASSES, num_domains=len(SOURCES), feature_dim=CHANNELS))
    steps = [per_domain_batches(step, SOURCES, PER_DOMAIN, range(CLASSES)) for step in range(3)]
    batches = [step_batch(m, shuffle_seed=s) for s, m in enumerate(steps)]
    network, optimizer, start = method_network(method, CLASSES, LR, WEIGHT_DECAY)
    runners = train_method(method, network, optimizer, [batch for batch, _ in batches])

    reference = DomainBedSagNet(start)
    names = reference.named_parameters()
    for step, ((batch, rows), runner) in enumerate(zip(batches, runners)):
        n = len(rows)
        # The reference holds the batch in its global order: row p is the sample at place p.
        in_order = torch.argsort(batch.order)
        draws = method.draws(step, 100, batch.sample_ids)
        swaps = [swap_permutation(seed, n) for seed in draws["swap_seeds"]]
        losses, grads = reference.update(batch.images[in_order], batch.labels[in_order],
                                         draws["style_weight"][in_order], swaps)
        torch.testing.assert_close(runner.loss, losses[0])
        got = runner.metrics
        torch.testing.assert_close(torch.stack([got["content_loss"], got["style_loss"], got["adversarial_loss"]]),
                                   torch.stack(losses))
        assert len(runner.updates) == 3
        for update, expected in zip(runner.updates, grads):
            expected = {name: grad for p, grad in expected for name, q in names.items() if q is p}
            assert update.keys() == expected.keys()
            assert_same_parameters(update, expected)
    assert_same_parameters(network, names)
    assert dict(network.named_parameters()).keys() == names.keys()


def test_style_weights_come_from_identities_and_swaps_from_the_step():
    method = SagNet(context=MethodContext(seed=3, num_classes=CLASSES, feature_dim=CHANNELS))
    ids = torch.arange(64, dtype=torch.int64) * 104729
    draws = method.draws(4, 100, ids)
    weights = draws["style_weight"]
    assert weights.min() >= 0 and weights.max() < 1 and abs(weights.mean().item() - 0.5) < 0.15
    assert torch.equal(method.draws(4, 100, ids[10:20])["style_weight"], weights[10:20])
    assert len(set(draws["swap_seeds"])) == 3 and draws["swap_seeds"] != method.draws(5, 100, ids)["swap_seeds"]


def test_a_head_that_does_not_start_with_global_pooling_is_refused():
    method = SagNet(context=MethodContext(num_classes=CLASSES, feature_dim=CHANNELS))
    network = Network(nn.Conv2d(3, CHANNELS, 3), nn.Sequential(nn.Flatten(), nn.LazyLinear(CLASSES)))
    network.method = method.build_modules()
    with pytest.raises(ConfigError, match="algorithm=sagnet .* needs a head that starts with global average pooling"):
        method.parameter_groups(network)
