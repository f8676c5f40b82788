"""GroupDRO against a plain single-process implementation of DomainBed's ``GroupDRO.update``: q
(ones over the source domains) multiplied by exp(eta x each domain's loss), renormalized, the
loss the q-weighted sum; q carried across steps."""

import pytest
import torch
import torch.nn.functional as F

from rsc_dist.methods.base import MethodContext
from rsc_dist.methods.groupdro import GroupDRO, GroupDROConfig
from support.method_reference import (LAYOUTS, NUM_CLASSES, NUM_DOMAINS, assert_matches_reference, step_data,
                                      tiny_network, train_method, train_reference)

ETA = 0.7  # large enough that q moves visibly in 3 steps


class DomainBedGroupDRO:
    """DomainBed's GroupDRO.update up to the backward, with its q kept across steps."""

    def __init__(self):
        self.q = torch.Tensor()

    def __call__(self, network, minibatches, step):
        if not len(self.q):
            self.q = torch.ones(len(minibatches), dtype=torch.float64)
        losses = torch.zeros(len(minibatches), dtype=torch.float64)
        for m, (x, y) in enumerate(minibatches):
            losses[m] = F.cross_entropy(network(x), y)
            self.q[m] *= (ETA * losses[m].data).exp()
        self.q /= self.q.sum()
        return torch.dot(losses, self.q), {"q": self.q, "groupdro_max_weight": self.q.max()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_groupdro_is_domainbeds_update(layout):
    ours = train_method("groupdro", {"eta": ETA}, layout)
    reference = train_reference(ours["start"], layout, DomainBedGroupDRO())
    assert_matches_reference(ours, reference)
    # The state after 3 steps: q over the sources is DomainBed's q (the target, index 3, keeps
    # the share it started with, shrunk by the normalizations; the loss never sees it).
    q = ours["state"]["method.q"]
    torch.testing.assert_close(q[:3] / q[:3].sum(), reference["values"][-1]["q"])
    assert not torch.allclose(reference["values"][-1]["q"], torch.full((3,), 1 / 3, dtype=torch.float64), atol=1e-3)


def test_an_absent_domain_keeps_its_weight_and_takes_no_part():
    """Merged sampling (docs/method.md): a domain absent from a step is not multiplied (its loss
    counts as 0, as in Sagawa et al.'s code) and the loss renormalizes q over those present."""
    network = tiny_network()
    method = GroupDRO(GroupDROConfig(eta=ETA), MethodContext(num_classes=NUM_CLASSES, num_domains=NUM_DOMAINS))
    network.method = method.build_modules()
    network.double()
    start_q = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    network.method.q.copy_(start_q)
    batch = step_data("merged", 0).batch
    present = batch.domains != 1
    batch = batch.replace(images=batch.images[present], labels=batch.labels[present],
                          domains=batch.domains[present], order=batch.order[present])
    out = method.objective(network, batch, {})
    risks = torch.stack([F.cross_entropy(network(batch.images[batch.domains == d]), batch.labels[batch.domains == d])
                         for d in (0, 2)])
    grown = start_q.clone()
    grown[[0, 2]] *= torch.exp(ETA * risks.detach())
    expected_q = grown / grown.sum()
    torch.testing.assert_close(out.state["q"], expected_q)
    weights = expected_q[[0, 2]] / expected_q[[0, 2]].sum()
    torch.testing.assert_close(out.loss, (weights * risks).sum())


def test_defaults_and_sweep_space_are_domainbeds(tmp_path):
    from support.method_reference import default_space_trials

    assert GroupDROConfig().eta == 1e-2  # groupdro_eta
    etas = [t["groupdro.eta"] for t in default_space_trials("groupdro", tmp_path)]
    assert all(1e-3 <= eta <= 1e-1 for eta in etas) and min(etas) < 3e-3 and max(etas) > 3e-2  # 10^U(-3, -1)
