"""model.dropout (DomainBed's ResNet dropout) reaches every built-in method: each forward of the
backbone a method's step makes is followed by the dropout, so no method computes on undropped
features when the config asks for dropout (a method calling ``network.features`` directly
instead of ``network.featurize`` would skip it silently)."""

import pytest
import torch
from torch import nn

from rsc_dist import methods
from rsc_dist.methods.base import MethodContext, StepBatch
from rsc_dist.models.heads import PooledLinearHead
from rsc_dist.models.network import Network
from rsc_dist.trainer.optim import build_optimizer
from rsc_dist.trainer.settings import OptimConfig
from rsc_dist.trainer.step import Runner
from support.method_reference import PlainAccelerator

BUILT_IN = tuple(name for name, method in methods.METHODS.items() if method.__module__.startswith("rsc_dist."))
DOMAINS, CLASSES, PER_DOMAIN, CHANNELS = 3, 3, 4, 4


def _batch(step: int) -> StepBatch:
    g = torch.Generator().manual_seed(step)
    n = DOMAINS * PER_DOMAIN
    images = torch.randn(n, 3, 6, 6, generator=g)
    return StepBatch(images=images, labels=torch.randint(0, CLASSES, (n,), generator=g), pixels=torch.zeros(0),
                     sample_ids=torch.arange(n) + 100 * step, domains=torch.arange(DOMAINS).repeat_interleave(PER_DOMAIN),
                     order=torch.arange(n), step=step)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_backbone_forward_of_a_step_goes_through_model_dropout(name):
    assert len(BUILT_IN) >= 11
    method_class = methods.get(name)
    settings = method_class.Section() if method_class.Section is not None else None
    method = methods.build(name, settings, MethodContext(num_classes=CLASSES, num_domains=DOMAINS, feature_dim=CHANNELS,
                                                         source_domains=tuple(range(DOMAINS)), balanced=True,
                                                         optimizer="adam"))
    torch.manual_seed(0)
    network = Network(nn.Sequential(nn.Conv2d(3, CHANNELS, 3, padding=1), nn.ReLU()), PooledLinearHead(CHANNELS, CLASSES),
                      dropout=0.5)
    network.method = method.build_modules()
    optimizer = build_optimizer(OptimConfig(name="adam", lr=0.01, weight_decay=0.0), method.parameter_groups(network))
    calls = {"features": 0, "dropout": 0}
    network.features.register_forward_hook(lambda *_: calls.__setitem__("features", calls["features"] + 1))
    network.dropout.register_forward_hook(lambda *_: calls.__setitem__("dropout", calls["dropout"] + 1))
    for step in range(3):  # DANN alternates its updates: both kinds run within 3 steps
        batch = _batch(step)
        method.train_step(Runner(PlainAccelerator(), network, optimizer, network, step), batch,
                          method.draws(step, 100, batch.sample_ids))
    assert calls["features"] > 0 and calls["dropout"] == calls["features"], calls
