"""The averaging rules as pure functions of numbers (no tensors): EMA's decay and SWAD's window.

**EMA** (timm's ``ModelEmaV3``): after optimizer update t (1-based), every averaged tensor moves
as ``avg <- decay_t * avg + (1 - decay_t) * w`` with

    u = max(0, t - start - 1);   decay_t = 0 if u == 0
    decay_t = clamp(1 - (1 + u / gamma)^-power, 0, decay)        with warm-up
    decay_t = decay                                              without

so the first update (and the ``start`` updates before it) copies the weights.

**SWAD** (Cha et al., NeurIPS 2021, section 3.3 and the authors' ``swad.LossValley``). Every
evaluation k closes a *segment*: the training steps since the previous evaluation. With L_k
the source validation loss at evaluation k (the mean over source domains of each domain's
mean cross-entropy, the authors' ``tr_outloss``), N_c = n_converge, N_e = n_tolerance and
r = tolerance_ratio:

- **start**: the first c whose loss is the smallest of the N_c evaluations from c on,
  ``L_c <= min(L_c .. L_{c+N_c-1})`` (decided at evaluation c + N_c - 1); the threshold is
  ``tau = (1 + r) * mean(L_c .. L_{c+N_c-1})``.
- **look back** (when N_e > N_c): the segments just before c that the N_e-long window still
  holds, c - (N_e - N_c) .. c - 1, are taken from the latest one whose loss exceeds tau on
  (all of them if none does).
- **valley**: from c on, segment i is taken while ``min(L_i .. L_{i+N_e-1}) <= tau``, decided
  at evaluation i + N_e - 1; the first i for which it fails ends the valley (the authors stop
  training there). When training ends first, the undecided segments are decided in order on
  the losses that exist (a shorter window), stopping at the first failure.

The averaged model is the mean of the weights after every training step of the taken
segments (``Averager`` weights each segment by its steps; the authors average segment means
uniformly, which is the same when every segment has as many steps). Where the authors' code
departs from this (the converge segment entered twice and the oldest look-back segment
skipped, github khanrc/swad issue 28; a segment entered at every evaluation while fewer than
N_e exist), the definition above is kept: each segment counts at most once.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


def ema_decay(update: int, decay: float, *, warmup: bool, gamma: float, power: float, start: int = 0) -> float:
    """The decay of optimizer update ``update`` (1-based), as timm's ``ModelEmaV3.get_decay(step)``."""
    since = max(0, update - start - 1)
    if since <= 0:
        return 0.0
    if not warmup:
        return decay
    return max(min(1.0 - (1.0 + since / gamma) ** -power, decay), 0.0)


ACCEPT, DROP = "accept", "drop"


@dataclass
class LossValley:
    """SWAD's window over segments, fed one validation loss per evaluation (see the module
    docstring). ``add`` returns what became of the segments it decided: [(segment index,
    ACCEPT | DROP)], in order; a segment not yet named is still pending. Pure numbers, so its
    state checkpoints as a dict and the decisions are the same on every rank."""

    n_converge: int = 3
    n_tolerance: int = 6
    tolerance_ratio: float = 0.3
    losses: list = field(default_factory=list)  # L_k of every evaluation so far
    converge: int | None = None  # c, once found
    threshold: float | None = None  # tau
    decided: int = 0  # segments before this index are decided (accepted or dropped)
    accepted: list = field(default_factory=list)  # indices of the taken segments, in order
    ended: bool = False  # the valley ended: nothing more is taken

    @property
    def converged(self) -> bool:
        return self.converge is not None

    def add(self, loss: float) -> list[tuple[int, str]]:
        """Record evaluation k's loss (k = the number of earlier calls)."""
        if self.ended:
            self.losses.append(float(loss))
            return [(len(self.losses) - 1, DROP)]
        self.losses.append(float(loss))
        k = len(self.losses) - 1
        out: list[tuple[int, str]] = []
        if not self.converged:
            if k + 1 < self.n_converge:
                return self._forget_old(k)
            c = k - self.n_converge + 1
            window = self.losses[c:k + 1]
            if self.losses[c] > min(window):
                return self._forget_old(k)
            self.converge = c
            self.threshold = (1.0 + self.tolerance_ratio) * statistics.fmean(window)
            out += self._look_back(c, k)
        out += self._decide_complete(k)
        return out

    def finish(self) -> list[tuple[int, str]]:
        """Training ended: decide the pending segments on the losses that exist."""
        if self.ended:
            return []
        if not self.converged:  # no valley was found: nothing is taken
            out = [(i, DROP) for i in range(self.decided, len(self.losses))]
            self.decided = len(self.losses)
            return out
        out = []
        for i in range(self.decided, len(self.losses)):
            out.append(self._decide(i, self.losses[i:]))
            if self.ended:
                out += [(j, DROP) for j in range(i + 1, len(self.losses))]
                break
        self.decided = len(self.losses)
        return out

    def _forget_old(self, k: int) -> list[tuple[int, str]]:
        """Before convergence: segments too old to be looked back to, or to start the valley."""
        keep_from = max(0, k + 2 - max(self.n_converge, self.n_tolerance))
        out = [(i, DROP) for i in range(self.decided, keep_from)]
        self.decided = max(self.decided, keep_from)
        return out

    def _look_back(self, c: int, k: int) -> list[tuple[int, str]]:
        first = min(max(self.decided, k - self.n_tolerance + 1, 0), c)  # the window's oldest, at most c
        start = first
        for j in range(c - 1, first - 1, -1):
            if self.losses[j] > self.threshold:
                start = j + 1
                break
        out = [(j, DROP) for j in range(self.decided, start)] + [(j, ACCEPT) for j in range(start, c)]
        self.accepted += list(range(start, c))
        self.decided = c
        return out

    def _decide_complete(self, k: int) -> list[tuple[int, str]]:
        out = []
        while not self.ended and self.decided + self.n_tolerance - 1 <= k:
            i = self.decided
            out.append(self._decide(i, self.losses[i:i + self.n_tolerance]))
            self.decided = i + 1
        if self.ended:
            out += [(j, DROP) for j in range(self.decided, k + 1)]
            self.decided = k + 1
        return out

    def _decide(self, i: int, window: list[float]) -> tuple[int, str]:
        if min(window) <= self.threshold:
            self.accepted.append(i)
            return i, ACCEPT
        self.ended = True
        return i, DROP

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in ("n_converge", "n_tolerance", "tolerance_ratio", "losses",
                                                    "converge", "threshold", "decided", "accepted", "ended")}

    @classmethod
    def from_state(cls, state: dict) -> "LossValley":
        return cls(**{key: (list(value) if isinstance(value, list) else value) for key, value in state.items()})
