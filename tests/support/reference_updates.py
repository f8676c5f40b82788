"""What the single-process reference tests of the DomainBed methods share (tests/test_methods_mixup.py,
_dann.py, _sagnet.py): a tiny network, fixed per-domain batches laid out as a step's global batch,
and a method's own ``train_step`` driven through the trainer's ``Runner`` without Accelerate
(support.method_reference.RecordingRunner, shared with the per-domain methods' tests), recording
the gradient of each update before its optimizer step.

The references themselves (DomainBed's updates written out with separate torch optimizers)
live in each test file: only the plumbing is shared.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from rsc_dist.methods.base import StepBatch
from rsc_dist.models.heads import PooledLinearHead
from rsc_dist.models.network import Network
from rsc_dist.trainer.optim import build_optimizer
from rsc_dist.trainer.settings import OptimConfig
from support.method_reference import RecordingRunner

CHANNELS, SIZE = 8, 6  # the features' channels (the pooled vector's size) and the images' side


def tiny_network(num_classes: int, seed: int = 0) -> Network:
    """Two convolutions and a pooled linear head (no BatchNorm: the references compare the
    methods' definitions, not BatchNorm's)."""
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, CHANNELS, 3, stride=2, padding=1),
                             nn.ReLU())
    return Network(features, PooledLinearHead(CHANNELS, num_classes))


def per_domain_batches(step: int, domains: tuple[int, ...], per_domain: int, labels: range) -> list[dict]:
    """DomainBed's minibatches of one step: one (images, labels) per training domain, fixed by the step."""
    g = torch.Generator().manual_seed(500 + step)
    return [{"domain": d, "x": torch.randn(per_domain, 3, SIZE, SIZE, generator=g),
             "y": torch.randint(labels.start, labels.stop, (per_domain,), generator=g),
             "ids": torch.randint(0, 2**62, (per_domain,), generator=g)} for d in domains]


def step_batch(minibatches: list[dict], shuffle_seed: int = 0) -> tuple[StepBatch, torch.Tensor]:
    """The step's global batch as the data stream lays it out (domain after domain; ``order`` the
    place in it), its rows shuffled so that a method must find samples by place, not by row.
    Returns the batch and the place of each row."""
    images = torch.cat([m["x"] for m in minibatches])
    n = images.shape[0]
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed))
    domains = torch.cat([torch.full((len(m["y"]),), m["domain"]) for m in minibatches])
    batch = StepBatch(images=images[rows], labels=torch.cat([m["y"] for m in minibatches])[rows],
                      pixels=torch.zeros(0), sample_ids=torch.cat([m["ids"] for m in minibatches])[rows],
                      domains=domains[rows], order=torch.arange(n)[rows])
    return batch, rows


def method_network(method, num_classes: int, lr: float, weight_decay: float):
    """A tiny network carrying the method's own modules, and the run's one Adam optimizer over
    the method's parameter groups (optim.* as DomainBed's lr and weight_decay); a frozen copy of
    the starting network for the reference."""
    network = tiny_network(num_classes)
    network.method = method.build_modules()
    start = copy.deepcopy(network)
    optimizer = build_optimizer(OptimConfig(name="adam", lr=lr, weight_decay=weight_decay),
                                method.parameter_groups(network))
    return network, optimizer, start


def train_method(method, network, optimizer, batches: list[StepBatch]) -> list[RecordingRunner]:
    """The method's own train_step on each batch in turn (global steps 0, 1, ...)."""
    runners = []
    for step, batch in enumerate(batches):
        runner = RecordingRunner(network, optimizer, step)
        out = method.train_step(runner, batch, method.draws(step, 100, batch.sample_ids))
        runner.loss = out.loss.detach()
        runner.metrics = {k: v.detach() for k, v in out.metrics.items()}
        runners.append(runner)
    return runners


def assert_same_parameters(got: nn.Module | dict, expected: dict, **tolerance) -> None:
    """Every tensor of ``expected`` ({name: tensor}) equals ``got``'s (a module's named parameters)."""
    got = dict(got.named_parameters()) if isinstance(got, nn.Module) else got
    assert expected, "nothing to compare"
    for name, value in expected.items():
        torch.testing.assert_close(got[name].detach(), value.detach(), msg=name, **tolerance)
