"""ERM: empirical risk minimization, the baseline every DG method is compared with.

The mean cross-entropy over the (pooled) training batch of all source domains, nothing else
(Vapnik 1998; DomainBed's ``ERM``). Everything it needs is the base class's default.
"""

from __future__ import annotations

from rsc_dist.methods.base import Method


class ERM(Method):
    name = "erm"
    summary = "plain cross-entropy on the pooled source domains (the baseline)"
