"""Domain-generalization methods, registered once.

A method is one file in this package (a ``Method`` subclass, see ``base.py``) and one entry in
``_REGISTERED`` below; the config's ``algorithm`` choices and sections, ``--algorithm``,
``--help``'s list of methods, the results tables' method keys, the sweep's default spaces and
the trajectory fingerprint all come from here (docs/extending.md walks through each kind of
method).

A method kept outside this package registers itself with ``register`` in a module named by
the environment variable ``RSC_DIST_METHOD_MODULES`` (comma-separated importable modules,
imported when this package is): every process of a run, the ranks that ``accelerate launch``
starts included, then sees it (the tests' own methods use this).
"""

from __future__ import annotations

import dataclasses
import importlib
import os

from rsc_dist.methods.base import Method, MethodContext
from rsc_dist.methods.coral import CORAL
from rsc_dist.methods.dann import CDANN, DANN
from rsc_dist.methods.erm import ERM
from rsc_dist.methods.groupdro import GroupDRO
from rsc_dist.methods.irm import IRM
from rsc_dist.methods.mixup import Mixup
from rsc_dist.methods.mmd import MMD
from rsc_dist.methods.rsc import RSC
from rsc_dist.methods.sagnet import SagNet
from rsc_dist.methods.vrex import VREx

PLUGINS_VARIABLE = "RSC_DIST_METHOD_MODULES"

# The registry. The first is the default algorithm.
_REGISTERED: tuple[type[Method], ...] = (
    RSC, ERM, CORAL,
    MMD, GroupDRO, IRM, VREx,  # DomainBed's per-domain methods
    Mixup, DANN, CDANN, SagNet,  # DomainBed's methods that change the inputs or train an adversary
)

METHODS: dict[str, type[Method]] = {method.name: method for method in _REGISTERED}
NAMES: tuple[str, ...] = tuple(METHODS)
DEFAULT = NAMES[0]


def register(method: type[Method]) -> type[Method]:
    """Add a method defined outside this package (usable as a class decorator). Call it when
    your module is imported, before rsc_dist.config is (``RSC_DIST_METHOD_MODULES`` does that)."""
    global NAMES
    if not method.name or not method.name.isidentifier():
        raise ValueError(f"a method's name must be a Python identifier (it names its config section); got {method.name!r}")
    if METHODS.get(method.name, method) is not method:
        raise ValueError(f"algorithm {method.name!r} is registered already ({METHODS[method.name].__module__})")
    METHODS[method.name] = method
    NAMES = tuple(METHODS)
    return method


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


def build(algorithm: str, settings, context: MethodContext) -> Method:
    """The configured method for a run (``settings``: its config section, or None)."""
    method = get(algorithm)(settings, context)
    method.check_context()
    return method


def _import_plugins() -> None:
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"{PLUGINS_VARIABLE}={os.environ[PLUGINS_VARIABLE]!r}: cannot import {module!r}: {exc}") from exc


_import_plugins()

__all__ = ["CDANN", "CORAL", "DANN", "DEFAULT", "ERM", "METHODS", "Method", "MethodContext", "Mixup", "NAMES", "RSC",
           "SagNet", "build", "get", "register", "section_keys", "sections"]
