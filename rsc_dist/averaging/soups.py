"""Averages across runs: model soups (Wortsman et al., ICML 2022) and DiWA (Ramé et al.,
NeurIPS 2022), as pure functions over state dicts and a scoring function.

- **uniform soup**: the element-wise mean of every ingredient's weights (DiWA's uniform
  average).
- **greedy soup** (Wortsman et al., Algorithm 1): the ingredients sorted by their own
  held-out score, best first; the soup starts with the best one, and each next ingredient is
  kept when the soup with it scores at least as well as without it. The score here is a
  selection rule's SOURCE validation score (rsc_dist/core/selection.py), never a target
  accuracy: the target domain stays unseen, as the DG protocol requires.

Averaging weights only makes sense for networks that share an initialization (the runs of a
sweep started from one checkpoint, DiWA's shared linear-probe start); rsc_dist.soup checks the
runs' recorded initialization fingerprints before calling these.
"""

from __future__ import annotations

from typing import Callable


def uniform_average(states: list[dict]) -> dict:
    """The element-wise mean of the floating-point tensors of ``states`` (summed in float64);
    other tensors (BatchNorm's batch counters) are taken from the first state."""
    if not states:
        raise ValueError("a soup needs at least one ingredient")
    first = states[0]
    for state in states[1:]:
        if state.keys() != first.keys() or any(state[k].shape != first[k].shape for k in first):
            raise ValueError("the ingredients' weights do not have the same tensors")
    out = {}
    for key, value in first.items():
        if value.is_floating_point():
            total = sum(state[key].double() for state in states)
            out[key] = (total / len(states)).to(value.dtype)
        else:
            out[key] = value.clone()
    return out


def greedy_soup(order: list[str], score: Callable[[list[str]], float]) -> tuple[list[str], list[dict]]:
    """Wortsman et al.'s greedy soup over ``order`` (the ingredients, best own score first):
    ``score(names)`` scores the uniform average of those ingredients. Returns the kept names
    and, per ingredient, what was tried: {"name", "soup_score" (the soup with it), "kept"}."""
    if not order:
        raise ValueError("a soup needs at least one ingredient")
    kept = [order[0]]
    best = score(kept)
    trace = [{"name": order[0], "soup_score": best, "kept": True}]
    for name in order[1:]:
        candidate = score(kept + [name])
        keep = candidate >= best
        trace.append({"name": name, "soup_score": candidate, "kept": keep})
        if keep:
            kept.append(name)
            best = candidate
    return kept, trace
