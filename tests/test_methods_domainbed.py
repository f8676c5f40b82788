"""MMD, GroupDRO, IRM and VREx together: on 2 DDP ranks they compute the single-process
objective, gradient and state where the generic suite's even, balanced split does not reach (a
merged batch whose domains are spread unevenly over the ranks, so IRM's halves cross ranks; a
domain absent from one rank; unequal local batches, which MMD's gather pads), in one launch for
the four; and they refuse gradient accumulation with one line."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from rsc_dist import methods
from rsc_dist.core.errors import ConfigError
from rsc_dist.methods.base import MethodContext, StepBatch
from support.dist_utils import run_on_ranks
from support.method_reference import NUM_CLASSES, NUM_DOMAINS, step_data, tiny_network

SETTINGS = {"mmd": {"penalty_weight": 3.0}, "groupdro": {"eta": 0.7},
            "irm": {"penalty_weight": 5.0, "anneal_steps": 0}, "vrex": {"penalty_weight": 5.0, "anneal_steps": 0}}


def _global_batch() -> StepBatch:
    return step_data("merged", 1).batch  # 15 samples: domains of 6, 4 and 5, interleaved


def _rank_rows(batch: StepBatch) -> list:
    """Rank 1: the first 3 rows of domains 0 and 2 (no domain 1); rank 0: the other 9."""
    rows = torch.arange(len(batch.labels))
    second = torch.cat([rows[batch.domains == 0][:3], rows[batch.domains == 2][:3]])
    first = rows[~torch.isin(rows, second)]
    return [first, second]


def _share(batch: StepBatch, rows) -> StepBatch:
    return batch.replace(images=batch.images[rows], labels=batch.labels[rows], pixels=batch.pixels[rows],
                         domains=batch.domains[rows], order=batch.order[rows], sample_ids=batch.sample_ids[rows])


def _step(name, group, capacity, batch):
    """The method's objective and backward on ``batch`` (this rank's share); loss, gradients, state."""
    method_class = methods.get(name)
    method = methods.build(name, method_class.Section(**SETTINGS[name]),
                           MethodContext(num_classes=NUM_CLASSES, num_domains=NUM_DOMAINS, feature_dim=4,
                                         process_group=group, capacity=capacity))
    network = tiny_network()
    network.method = method.build_modules()
    network.double()
    model = DistributedDataParallel(network) if group is not None else network
    out = model(batch.images, objective=method.objective, batch=batch, draws=method.draws(3, 100, batch.sample_ids))
    out.loss.backward()
    return {"loss": out.loss.detach(), "metrics": {k: v.detach() for k, v in out.metrics.items()},
            "grads": {k: p.grad.clone() for k, p in network.named_parameters()},
            "state": {k: v.detach() for k, v in out.state.items()}}


def _worker(rank, world_size, out_dir):
    batch = _global_batch()
    rows = _rank_rows(batch)
    capacity = max(len(r) for r in rows)
    results = {name: _step(name, dist.group.WORLD, capacity, _share(batch, rows[rank])) for name in SETTINGS}
    torch.save(results, Path(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("domainbed_two_ranks")
    run_on_ranks(_worker, 2, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_two_uneven_ranks_compute_the_single_process_step(two_ranks, name):
    batch = _global_batch()
    assert [len(r) for r in _rank_rows(batch)] == [9, 6]
    single = _step(name, None, None, batch)
    for rank in two_ranks:
        got = rank[name]
        torch.testing.assert_close(got["loss"], single["loss"], rtol=1e-10, atol=1e-12)
        for key, value in single["metrics"].items():
            torch.testing.assert_close(got["metrics"][key], value, rtol=1e-10, atol=1e-12)
        for key, grad in single["grads"].items():
            assert grad.abs().sum() > 0, key
            torch.testing.assert_close(got["grads"][key], grad, rtol=1e-9, atol=1e-12, msg=key)
        for key, value in single["state"].items():
            torch.testing.assert_close(got["state"][key], value, rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_gradient_accumulation_is_refused_in_one_line(name):
    with pytest.raises(ConfigError) as refused:
        methods.build(name, None, MethodContext(num_classes=NUM_CLASSES, num_domains=NUM_DOMAINS, grad_accum=2))
    message = str(refused.value)
    assert message.startswith(f"algorithm={name} cannot run with train.grad_accum=2: ") and "\n" not in message
    assert "whole batch" in message and message.endswith("raise data.global_batch_size instead")
    methods.build(name, None, MethodContext(num_classes=NUM_CLASSES, num_domains=NUM_DOMAINS, grad_accum=1))
