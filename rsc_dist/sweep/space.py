"""Search spaces: grid axes, seeded random distributions, and per-method default spaces.

A space maps a dotted config field to one of
    VALUE                       fixed (the same as an override)
    [V1, V2, ...]               a grid axis: every value is tried
    {uniform: [LO, HI]}         LO + (HI - LO) * u
    {log_uniform: [LO, HI]}     exp(log LO + (log HI - log LO) * u)       (LO, HI > 0)
    {int_uniform: [LO, HI]}     floor of the uniform draw, in [LO, HI)
    {int_log_uniform: [LO, HI]} floor of the log-uniform draw, in [LO, HI)
    {choice: [V1, V2, ...]}     one of the values, each equally likely
where u in [0, 1) comes from a hash of (search seed, draw index, field name): the same file
always gives the same trials, on any machine and Python version, and a field's draws do not
change when another field is added. Like DomainBed's registry, the seed does not depend on the
method, so draw k of `optim.lr` is the same value for ERM and RSC (paired trials).

``default_space(method, config)`` is this project's registry in the spirit of DomainBed's
``hparams_registry`` (docs/method.md, "Sweeps and selection across trials"), scaled to the
preset so it suits SGD recipes (lr 0.01) and Adam ones (lr 5e-5) alike.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform", "int_log_uniform", "choice")


class SpaceError(ValueError):
    """A space entry that cannot be used; the message names the field."""


@dataclass(frozen=True)
class Distribution:
    kind: str  # one of DISTRIBUTIONS
    args: tuple

    def draw(self, u: float):
        if self.kind == "choice":
            return self.args[min(int(u * len(self.args)), len(self.args) - 1)]
        low, high = self.args
        if self.kind in ("log_uniform", "int_log_uniform"):
            value = math.exp(math.log(low) + (math.log(high) - math.log(low)) * u)
        else:
            value = low + (high - low) * u
        return int(math.floor(value)) if self.kind.startswith("int_") else value

    def extremes(self) -> list:
        """Values that bound every draw (checked against the config's types and ranges)."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args
        if self.kind.startswith("int_"):
            return [int(low), max(int(low), int(math.ceil(high)) - 1)]
        return [low, high]

    def describe(self) -> str:
        return f"{self.kind}{list(self.args)}"


def parse_entry(field: str, raw, where: str):
    """A space entry -> ("fixed", value) | ("grid", [values]) | ("random", Distribution)."""
    if isinstance(raw, list):
        if not raw:
            raise SpaceError(f"{where}: {field}: an empty list (a grid axis needs at least one value)")
        return "grid", list(raw)
    if not isinstance(raw, dict):
        return "fixed", raw
    if len(raw) != 1:
        raise SpaceError(f"{where}: {field}: a distribution is one of {', '.join(DISTRIBUTIONS)} "
                         f"with its arguments, e.g. {{log_uniform: [1e-5, 1e-3]}}; got {raw!r}")
    (kind, args), = raw.items()
    if kind not in DISTRIBUTIONS:
        raise SpaceError(f"{where}: {field}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list) or not args:
        raise SpaceError(f"{where}: {field}: {kind} needs a list of arguments; got {args!r}")
    if kind == "choice":
        return "random", Distribution(kind, tuple(args))
    if len(args) != 2 or not all(_is_number(a) for a in args):
        raise SpaceError(f"{where}: {field}: {kind} needs [LOW, HIGH] numbers; got {args!r}")
    low, high = (float(a) for a in args)
    if not low < high:
        raise SpaceError(f"{where}: {field}: {kind} needs LOW < HIGH; got {args!r}")
    if "log" in kind and low <= 0:
        raise SpaceError(f"{where}: {field}: {kind} needs LOW > 0; got {args!r}")
    if kind.startswith("int_") and int(math.ceil(high)) - 1 < low:
        raise SpaceError(f"{where}: {field}: {kind} [LOW, HIGH) holds no integer; got {args!r}")
    return "random", Distribution(kind, (low, high))


def _is_number(value) -> bool:
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            float(value)
            return True
        except ValueError:
            return False
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def unit(seed: int, draw: int, field: str) -> float:
    """A number in [0, 1) that depends only on its arguments."""
    digest = hashlib.sha256(f"rsc_dist.sweep|{seed}|{draw}|{field}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def default_space(method: str, config: dict) -> dict:
    """The registry: {field: raw space entry} for ``method`` on a preset (``config``: the preset's
    resolved config as a flat {dotted key: value} dict).

    Every method: the learning rate log-uniform over [lr/5, lr*5] around the preset's value
    (DomainBed: 10^U(-5, -3.5) around Adam's 5e-5), weight decay log-uniform over [1e-6, 1e-2]
    (DomainBed's range), the batch size log-uniform over [b/4, 1.5 b) (DomainBed: 2^U(3, 5.5)
    around 32); a preset with data.global_batch_size draws that from {g/4, g/2, g} instead, so
    it stays divisible by the number of processes it was divisible by. RSC adds the muted
    fractions it uses (DomainBed: U(0, 0.5) for its feature and batch drop factors): p_spatial
    and/or p_channel as rsc.mode asks, p_batch unless the released schedule replaces it; CORAL
    its penalty weight (DomainBed: 10^U(-1, 1)). Each method declares its own part
    (``Method.sweep_space`` in rsc_dist/methods/).
    """
    lr = float(config["optim.lr"])
    space = {
        "optim.lr": {"log_uniform": [lr / 5, lr * 5]},
        "optim.weight_decay": {"log_uniform": [1e-6, 1e-2]},
    }
    global_batch = config.get("data.global_batch_size")
    if global_batch:
        space["data.global_batch_size"] = {"choice": sorted({max(1, global_batch // 4), max(1, global_batch // 2),
                                                             global_batch})}
    else:
        batch = int(config["data.batch_size"])
        space["data.batch_size"] = {"int_log_uniform": [max(1, batch // 4), max(batch // 4 + 1, batch * 3 // 2)]}
    from rsc_dist import methods  # the method's own fields come from its registry entry

    space.update(methods.get(method).sweep_space(config))
    return space
