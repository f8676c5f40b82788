"""What the reference tests of DomainBed's per-domain methods share (tests/test_methods_mmd.py,
_groupdro, _irm, _vrex): fixed per-domain batches laid out as a step's global batch, a tiny
float64 network, and the method's own train_step driven through the trainer's Runner on one
process, with every step's loss, gradients and state recorded for a plain reference to match.

The batches: 3 source domains of the manifest's 4 (index 3, a target, never appears). Layout
"balanced": 6 samples per domain, domain after domain (data.sampling=balanced). Layout
"merged": 6, 4 and 5 samples, the domains interleaved in the global order, and the rows handed
to the method in yet another order (``order`` says where each sits), as a rank's share is.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from rsc_dist import methods
from rsc_dist.methods.base import MethodContext, StepBatch
from rsc_dist.models.heads import PooledLinearHead
from rsc_dist.models.network import Network
from rsc_dist.trainer.optim import build_optimizer
from rsc_dist.trainer.settings import OptimConfig
from rsc_dist.trainer.step import Runner

NUM_DOMAINS, NUM_CLASSES, STEPS = 4, 3, 3
DOMAIN_SIZES = {"balanced": (6, 6, 6), "merged": (6, 4, 5)}
LAYOUTS = tuple(DOMAIN_SIZES)


@dataclass
class StepData:
    """One step: the per-domain minibatches (DomainBed's ``minibatches``: (x, y) per source
    domain, in the global per-domain order) and the same samples as the method's StepBatch."""

    minibatches: list
    batch: StepBatch


def step_data(layout: str, step: int) -> StepData:
    g = torch.Generator().manual_seed(100 * step + len(layout))
    sizes = DOMAIN_SIZES[layout]
    minibatches = [(torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64),
                    torch.randint(0, NUM_CLASSES, (n,), generator=g)) for n in sizes]
    domains = torch.cat([torch.full((n,), d) for d, n in enumerate(sizes)])
    within = torch.cat([torch.arange(n) for n in sizes])
    if layout == "balanced":
        place = torch.arange(len(domains))
    else:  # interleaved: a domain's samples keep their relative order
        place = torch.empty(len(domains), dtype=torch.long)
        place[torch.argsort(within * len(sizes) + domains, stable=True)] = torch.arange(len(domains))
    images = torch.cat([x for x, _ in minibatches])
    labels = torch.cat([y for _, y in minibatches])
    rows = torch.arange(len(domains)) if layout == "balanced" else torch.randperm(len(domains), generator=g)
    batch = StepBatch(images=images[rows], labels=labels[rows], pixels=images[rows], domains=domains[rows],
                      order=place[rows], sample_ids=rows)
    return StepData(minibatches, batch)


def tiny_network(seed: int = 0) -> Network:
    """Conv + ReLU features (N, 4, 5, 5) and a pooled linear head, in float64; no BatchNorm (the
    reference tests compare with BatchNorm out of the way, as the suite freezes it)."""
    torch.manual_seed(seed)
    features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    return Network(features, PooledLinearHead(4, NUM_CLASSES)).double()


class PlainAccelerator:
    """What the Runner asks of Accelerate, on one process without mixed precision."""

    def autocast(self):
        return nullcontext()

    def backward(self, loss):
        loss.backward()


class RecordingRunner(Runner):
    """The trainer's Runner on a plain network (every reference test's, here and in
    support.reference_updates); keeps, for each optimizer step, the gradients of the parameters
    it steps ({parameter name: gradient}) as the optimizer is about to use them."""

    def __init__(self, network: Network, optimizer, step: int):
        super().__init__(PlainAccelerator(), network, optimizer, network, step)
        self.updates: list[dict] = []
        self._names = {id(p): name for name, p in network.named_parameters()}

    def optimizer_step(self, groups=None):
        stepped = [g for g in self.optimizer.param_groups if groups is None or g["name"] in groups]
        self.updates.append({self._names[id(p)]: p.grad.detach().clone() for g in stepped for p in g["params"]
                             if p.grad is not None})
        super().optimizer_step(groups)


def train_method(name: str, overrides: dict, layout: str, *, lr: float = 0.05) -> dict:
    """``STEPS`` steps of method ``name`` (its Section with ``overrides``) with Adam: each step's
    loss and metrics, gradients, the network's state dict after the last step, the network it
    started from."""
    method_class = methods.get(name)
    settings = method_class.Section(**overrides) if method_class.Section is not None else None
    network = tiny_network()
    start = copy.deepcopy(network)
    method = methods.build(name, settings, MethodContext(num_classes=NUM_CLASSES, num_domains=NUM_DOMAINS,
                                                         feature_dim=4, balanced=layout == "balanced"))
    network.method = method.build_modules()
    network.double()
    optimizer = build_optimizer(OptimConfig(name="adam", lr=lr, weight_decay=0.0), method.parameter_groups(network))
    record = {"loss": [], "metrics": [], "grads": []}
    for step in range(STEPS):
        batch = step_data(layout, step).batch
        runner = RecordingRunner(network, optimizer, step)
        out = method.train_step(runner, batch, method.draws(step, 100, batch.sample_ids))
        record["grads"].extend(runner.updates)
        record["loss"].append(out.loss.detach())
        record["metrics"].append({k: v.detach() for k, v in out.metrics.items()})
    record["state"] = {k: v.detach().clone() for k, v in network.state_dict().items()}
    record["start"] = start
    return record


def parameter_grads(network: nn.Module) -> dict:
    return {name: p.grad.detach().clone() for name, p in network.named_parameters() if p.grad is not None}


def assert_matches_reference(ours: dict, reference: dict) -> None:
    """Every step's loss, metrics (those the reference computes under the same name) and
    gradients, and the weights after the last step, agree (float64)."""
    assert len(ours["loss"]) == len(reference["loss"]) == STEPS
    for step in range(STEPS):
        torch.testing.assert_close(ours["loss"][step], reference["loss"][step], rtol=1e-9, atol=1e-12,
                                   msg=f"loss at step {step}")
        for name, value in ours["metrics"][step].items():
            if name in reference["values"][step]:
                torch.testing.assert_close(value, reference["values"][step][name], rtol=1e-9, atol=1e-12,
                                           msg=f"{name} at step {step}")
        assert reference["grads"][step].keys() <= ours["grads"][step].keys()
        for key, grad in reference["grads"][step].items():
            assert grad.abs().sum() > 0, key
            torch.testing.assert_close(ours["grads"][step][key], grad, rtol=1e-8, atol=1e-12,
                                       msg=f"gradient of {key} at step {step}")
    for key, value in reference["weights"].items():
        torch.testing.assert_close(ours["state"][key], value, rtol=1e-8, atol=1e-12, msg=key)


def default_space_trials(name: str, tmp_path, n_trials: int = 40) -> list[dict]:
    """The hyperparameters of ``n_trials`` trials of method ``name`` drawn from its default
    space on the DomainBed preset, through the sweep file's own validation (each distribution's
    extremes checked against the config field's type and range)."""
    import yaml

    from rsc_dist.sweep.spec import load_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"preset": "domainbed_pacs_resnet50", "methods": [name], "default_space": True,
                                    "n_trials": n_trials, "targets": ["sketch"]}))
    return [run.hparams for run in load_sweep(path).runs]


def train_reference(network: nn.Module, layout: str, step_loss, *, lr: float = 0.05, fresh_adam_at: int | None = None
                    ) -> dict:
    """A plain single-process DomainBed training loop: Adam over ``network``; at each step
    ``step_loss(network, minibatches, step) -> (loss, {name: value})`` (the method's update as
    DomainBed writes it), one backward, one Adam step; a new Adam at step ``fresh_adam_at``
    (DomainBed's IRM and VREx, before the backward). Each step's loss, gradients and values,
    and the weights at the end."""
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    record = {"loss": [], "grads": [], "values": []}
    for step in range(STEPS):
        loss, values = step_loss(network, step_data(layout, step).minibatches, step)
        if step == fresh_adam_at:
            optimizer = torch.optim.Adam(network.parameters(), lr=lr)
        optimizer.zero_grad()
        loss.backward()
        record["grads"].append(parameter_grads(network))
        optimizer.step()
        record["loss"].append(loss.detach())
        record["values"].append({name: value.detach().clone() for name, value in values.items()})
    record["weights"] = network.state_dict()
    return record
