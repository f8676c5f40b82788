"""Two gloo ranks compute what one process computes on the concatenated batch.

Each test's cases run in one 2-rank launch (a module fixture), so the ranks start once."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from rsc_dist.methods import RSC
from rsc_dist.methods.base import MethodContext, StepBatch
from rsc_dist.methods.rsc_masks import rsc_mask
from rsc_dist.models.build import build_model
from rsc_dist.models.heads import PooledLinearHead
from support.dist_utils import run_on_ranks

NUM_CLASSES = 5


def _feature_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(n, 32, 7, 9, generator=g))
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    head = PooledLinearHead(32, NUM_CLASSES)
    with torch.no_grad():  # weights large enough that muting features changes confidences
        head.fc.weight.copy_(torch.randn(NUM_CLASSES, 32, generator=g))
        head.fc.bias.copy_(torch.randn(NUM_CLASSES, generator=g))
    return z, y, head


def _local_slice(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _on_two_ranks(tmp_path_factory, worker, cases):
    out = tmp_path_factory.mktemp(worker.__name__)
    for index in range(len(cases)):
        (out / str(index)).mkdir()
    run_on_ranks(_run_cases, 2, worker, str(out), cases)
    return {case: out / str(index) for index, case in enumerate(cases)}


def _run_cases(rank, world_size, worker, out_dir, cases):
    for index, case in enumerate(cases):
        worker(rank, world_size, *case, Path(out_dir, str(index)))


def _masks_worker(rank, world_size, sizes, use_capacity, out_dir):
    z, y, head = _feature_batch(sum(sizes))
    part = _local_slice(sizes, rank)
    capacity = max(sizes) if use_capacity else None
    results = {}
    for mode in ("spatial", "channel"):
        results[mode, "global"] = rsc_mask(
            z[part], head, y[part], mode=mode, process_group=dist.group.WORLD, capacity=capacity
        )
        results[mode, "per_rank"] = rsc_mask(z[part], head, y[part], mode=mode, process_group=None)
    torch.save(results, Path(out_dir, f"rank{rank}.pt"))


SELECTION_CASES = [((16, 16), True), ((16, 16), False), ((11, 21), True), ((21, 11), False)]


@pytest.fixture(scope="module")
def selection_on_two_ranks(tmp_path_factory):
    return _on_two_ranks(tmp_path_factory, _masks_worker, SELECTION_CASES)


@pytest.mark.parametrize("sizes, use_capacity", SELECTION_CASES)
def test_global_selection_equals_single_process(selection_on_two_ranks, sizes, use_capacity):
    tmp_path = selection_on_two_ranks[sizes, use_capacity]
    z, y, head = _feature_batch(sum(sizes))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for mode in ("spatial", "channel"):
        single = rsc_mask(z, head, y, mode=mode)
        merged = torch.cat([ranks[r][mode, "global"] for r in range(2)])
        assert torch.equal(merged, single), mode
        # Per-rank selection is a different algorithm: show it.
        per_rank = torch.cat([ranks[r][mode, "per_rank"] for r in range(2)])
        assert not torch.equal(per_rank, single), mode
        # ...and it is what one process computes on each rank's batch alone.
        for r in range(2):
            part = _local_slice(sizes, r)
            assert torch.equal(ranks[r][mode, "per_rank"], rsc_mask(z[part], head, y[part], mode=mode))


def _image_batch(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _model(process_group=None, capacity=None):
    """The network and the RSC method whose objective it runs (global selection over the group)."""
    torch.manual_seed(0)
    model = build_model("resnet18", NUM_CLASSES)
    model.rsc = RSC(context=MethodContext(process_group=process_group, capacity=capacity))
    model.train()
    # Frozen BatchNorm statistics: per-rank batch statistics legitimately differ from those of
    # one process on the whole batch (SyncBatchNorm gives exact equivalence in training).
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eval()
    return model


def _rsc_forward(model, rsc, x, y, mode):
    """The RSC objective through ``model``'s forward (a DDP module or the network itself)."""
    return model(x, objective=rsc.objective, batch=StepBatch(images=x, labels=y, pixels=x),
                 draws={"mode": mode, "p_batch": 0.5})


def _step_grads(model, rsc, x, y, mode, loss_scale):
    logits = _rsc_forward(model, rsc, x, y, mode).logits
    # Sum over local samples / global N, times world size: DDP's gradient average then equals
    # the single process's mean over the global batch, even with unequal local batches.
    loss = F.cross_entropy(logits, y, reduction="sum") * loss_scale
    loss.backward()
    return {n.removeprefix("module."): p.grad.detach().clone() for n, p in model.named_parameters()}


def _ddp_worker(rank, world_size, sizes, mode, out_dir):
    x, y = _image_batch(sum(sizes))
    part = _local_slice(sizes, rank)
    network = _model(dist.group.WORLD, max(sizes))
    model = DistributedDataParallel(network)
    grads = _step_grads(model, network.rsc, x[part], y[part], mode, world_size / sum(sizes))
    with torch.no_grad():
        mask = _rsc_forward(network, network.rsc, x[part], y[part], mode).mask
    torch.save({"grads": grads, "mask": mask}, Path(out_dir, f"rank{rank}.pt"))


DDP_CASES = [((4, 4), "spatial"), ((3, 6), "channel")]


@pytest.fixture(scope="module")
def ddp_steps_on_two_ranks(tmp_path_factory):
    return _on_two_ranks(tmp_path_factory, _ddp_worker, DDP_CASES)


@pytest.mark.parametrize("sizes, mode", DDP_CASES)
def test_ddp_step_gradients_equal_single_process(ddp_steps_on_two_ranks, sizes, mode):
    tmp_path = ddp_steps_on_two_ranks[sizes, mode]
    x, y = _image_batch(sum(sizes))
    single = _model()
    reference = _step_grads(single, single.rsc, x, y, mode, 1 / sum(sizes))
    with torch.no_grad():
        single_mask = _rsc_forward(single, single.rsc, x, y, mode).mask
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(torch.cat([r["mask"] for r in ranks]), single_mask)
    assert (single_mask == 0).any(), "the test must mask something to mean anything"
    for rank in ranks:
        for name, grad in reference.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
