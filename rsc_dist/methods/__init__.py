"""Domain-generalization methods, registered once.

Adding a method is one file in this package (a ``Method`` subclass, see ``base.py``) and one
line in ``_REGISTERED`` below; the config's ``algorithm`` choices, its sections, ``--algorithm``,
the results tables' method keys and the trajectory fingerprint all come from here
(docs/extending.md walks through CORAL as the example).
"""

from __future__ import annotations

import dataclasses

from rsc_dist.methods.base import Method
from rsc_dist.methods.coral import CORAL
from rsc_dist.methods.erm import ERM
from rsc_dist.methods.rsc import RSC

# The registry. The first is the default algorithm.
_REGISTERED: tuple[type[Method], ...] = (RSC, ERM, CORAL)

METHODS: dict[str, type[Method]] = {method.name: method for method in _REGISTERED}
NAMES: tuple[str, ...] = tuple(METHODS)
DEFAULT = NAMES[0]


def get(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; registered: {', '.join(NAMES)}") from None


def sections() -> dict[str, type]:
    """{method name: its config section class}, for the methods that have one."""
    return {name: method.Section for name, method in METHODS.items() if method.Section is not None}


def section_keys(name: str) -> tuple[str, ...]:
    """The dotted config keys of a method's section ("rsc.p_batch", ...); () without one."""
    section = METHODS[name].Section
    return tuple(f"{name}.{f.name}" for f in dataclasses.fields(section)) if section is not None else ()


def build(config, **context) -> Method:
    """The configured method, with the run's context (process_group, capacity, num_domains)."""
    return get(config.algorithm).from_config(config, **context)


__all__ = ["CORAL", "DEFAULT", "ERM", "METHODS", "Method", "NAMES", "RSC", "build", "get", "section_keys",
           "sections"]
