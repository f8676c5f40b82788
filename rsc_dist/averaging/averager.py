"""The averaged weights of a run and their state: updated after every optimizer step, closed
into segments at evaluations (SWAD), checkpointed whole, loaded on any number of ranks.

Every average is a running mean kept in place, one ``torch._foreach_lerp_`` per update over
this rank's shares of the fp32 weights (rsc_dist.averaging.fragments): no collective, no copy
of the weights per step.

- ``ema``: ``avg <- avg + (1 - decay_t) (w - avg)`` after optimizer update t (rules.ema_decay).
- ``swa``: the mean of the weights after every training step from ``swa_start_step`` on:
  ``avg <- avg + (w - avg) / n``.
- ``swad``: the mean over the steps of the current segment (since the last evaluation), the
  segments the loss-valley rule has not decided yet, and the mean over every step of the
  accepted segments, each segment weighted by its number of steps (rules.LossValley).

The records of the averaged model's evaluations (history, best, last) are part of the state,
so a resumed run reports what an uninterrupted one reports.
"""

from __future__ import annotations

import torch

from rsc_dist.averaging.rules import ACCEPT, LossValley, ema_decay
from rsc_dist.averaging.settings import LABELS, AveragingConfig
from rsc_dist.core import selection


def _lerp(averages: list[torch.Tensor], weights: list[torch.Tensor], weight: float) -> None:
    """averages <- averages + weight * (weights - averages), in place."""
    if averages:
        torch._foreach_lerp_(averages, weights, weight)


class Averager:
    """The averaged weights of one run (``kind`` ema | swa | swad) over ``fragments``' shares."""

    def __init__(self, kind: str, settings: AveragingConfig, fragments, selection_rule: str = "last"):
        if kind not in LABELS:
            raise ValueError(f"unknown averaging {kind!r}; choose one of {', '.join(LABELS)}")
        self.kind, self.settings, self.fragments = kind, settings, fragments
        self.selection_rule = selection_rule
        self.updates = 0  # optimizer updates seen
        self.average: list[torch.Tensor] | None = None  # ema, swa; swad: the accepted segments' mean
        self.steps = 0  # training steps in the average
        self.first_step = self.last_step = None
        # swad only
        self.segment: list[torch.Tensor] | None = None
        self.segment_steps, self.segment_first = 0, None
        self.pending: dict[int, dict] = {}  # segment index -> {"weights", "steps", "first", "last"}
        self.segments = 0  # segments closed so far
        self.valley = LossValley(settings.swad_n_converge, settings.swad_n_tolerance, settings.swad_tolerance_ratio)
        self.finished = False  # swad: the final average is decided
        self.records = {"history": [], "best": {}, "last": {}}

    @property
    def label(self) -> str:
        return LABELS[self.kind]

    # -- per optimizer step --------------------------------------------------------------------

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """The weights after the optimizer update that ended training step ``step`` (1-based)."""
        self.updates += 1
        if self.kind == "ema":
            current = self.fragments.live()
            if self.average is None:
                self.average = self.fragments.copies()
            s = self.settings
            decay = ema_decay(self.updates, s.ema_decay, warmup=s.ema_warmup, gamma=s.ema_warmup_gamma,
                              power=s.ema_warmup_power, start=s.ema_start_step)
            _lerp(self.average, current, 1.0 - decay)
            self._took(step)
        elif self.kind == "swa":
            if step < self.settings.swa_start_step:
                return
            if self.average is None:
                self.average = self.fragments.copies()
            else:
                _lerp(self.average, self.fragments.live(), 1.0 / (self.steps + 1))
            self._took(step)
        elif not self.valley.ended:  # swad: the open segment
            if self.segment is None:
                self.segment, self.segment_steps, self.segment_first = self.fragments.copies(), 1, step
            else:
                self.segment_steps += 1
                _lerp(self.segment, self.fragments.live(), 1.0 / self.segment_steps)

    def _took(self, step: int) -> None:
        self.steps += 1
        self.first_step = step if self.first_step is None else self.first_step
        self.last_step = step

    # -- at evaluations -----------------------------------------------------------------------

    def at_evaluation(self, step: int, evaluation: dict) -> bool:
        """SWAD: close the open segment with the evaluation's source validation loss and apply
        the rule's decisions. True when the valley has just ended (the run may stop)."""
        if self.kind != "swad" or self.valley.ended:
            return False
        loss = evaluation.get("val_loss_mean")
        if loss is None:
            raise ValueError(f"SWAD needs the source validation loss of every evaluation; step {step} has none")
        index = self.segments
        self.segments += 1
        if self.segment is not None:
            self.pending[index] = {"weights": self.segment, "steps": self.segment_steps,
                                   "first": self.segment_first, "last": step}
        self.segment, self.segment_steps, self.segment_first = None, 0, None
        self._apply(self.valley.add(loss))
        return self.valley.ended

    def finish(self) -> None:
        """Training ended: SWAD decides its pending segments; its average is then final."""
        if self.kind == "swad" and not self.finished:
            self._apply(self.valley.finish())
            self.pending.clear()
            self.segment = None
        self.finished = True

    @torch.no_grad()
    def _apply(self, decisions: list[tuple[int, str]]) -> None:
        for index, decision in decisions:
            segment = self.pending.pop(index, None)
            if decision != ACCEPT or segment is None:
                continue
            if self.average is None:
                self.average = segment["weights"]
            else:  # each step of the segment weighs as much as each step already averaged
                _lerp(self.average, segment["weights"], segment["steps"] / (self.steps + segment["steps"]))
            self.steps += segment["steps"]
            self.first_step = segment["first"] if self.first_step is None else self.first_step
            self.last_step = segment["last"]

    # -- what it holds --------------------------------------------------------------------------

    @property
    def has_average(self) -> bool:
        """Whether there is an averaged model to evaluate now (SWAD: once finished, if a valley was found)."""
        if self.kind == "swad":
            return self.finished and self.average is not None
        return self.average is not None

    def whole_average(self) -> dict[str, torch.Tensor] | None:
        """{parameter name: whole fp32 tensor} of the averaged model (a collective under ZeRO:
        call on every rank), or None when there is none (has_average)."""
        return self.fragments.whole(self.average) if self.has_average else None

    def window(self) -> dict:
        """What the average holds, for results.json."""
        out = {"steps_averaged": self.steps, "first_step": self.first_step, "last_step": self.last_step,
               "optimizer_updates": self.updates}
        if self.kind == "ema":
            s = self.settings
            out["decay"] = ema_decay(self.updates, s.ema_decay, warmup=s.ema_warmup, gamma=s.ema_warmup_gamma,
                                     power=s.ema_warmup_power, start=s.ema_start_step)
        if self.kind == "swad":
            valley = self.valley
            out.update({"segments_averaged": len(valley.accepted), "segments": self.segments,
                        "converge_segment": valley.converge, "threshold": valley.threshold,
                        "valley_ended": valley.ended, "losses": list(valley.losses)})
        return out

    def note(self) -> str | None:
        if self.kind == "swad" and self.finished and self.average is None:
            if not self.valley.converged:
                return (f"no loss valley: over {len(self.valley.losses)} evaluation(s) the source validation loss "
                        f"never stopped falling for {self.valley.n_converge} evaluations (averaging.swad_n_converge)")
            return "the loss valley ended before any segment was taken"
        if self.kind == "swa" and self.average is None:
            return f"no step reached averaging.swa_start_step={self.settings.swa_start_step}"
        return None

    # -- records of its evaluations -------------------------------------------------------------

    def record(self, evaluation: dict) -> bool:
        """Store an evaluation of the averaged model; True when train.selection makes it its best."""
        records = self.records
        records["last"] = evaluation
        records["history"].append(evaluation)
        if selection.replaces(self.selection_rule, evaluation, records["best"]):
            records["best"] = evaluation
            return True
        return False

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Whole tensors (on the CPU) and every number: loads on any number of ranks. A
        collective under ZeRO with several ranks (Accelerate calls it on every rank)."""
        def whole(shares):
            if shares is None:
                return None
            return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in self.fragments.whole(shares).items()}

        return {"kind": self.kind, "updates": self.updates, "steps": self.steps, "first_step": self.first_step,
                "last_step": self.last_step, "average": whole(self.average), "segment": whole(self.segment),
                "segment_steps": self.segment_steps, "segment_first": self.segment_first,
                "pending": {index: {**segment, "weights": whole(segment["weights"])}
                            for index, segment in sorted(self.pending.items())},
                "segments": self.segments, "valley": self.valley.state_dict(), "finished": self.finished,
                "records": self.records}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"the checkpoint's averaging is {state.get('kind')!r}, this run's {self.kind!r}")

        def shares(whole):
            return None if whole is None else self.fragments.share(whole, "the checkpoint's averaged weights")

        self.updates, self.steps = state["updates"], state["steps"]
        self.first_step, self.last_step = state["first_step"], state["last_step"]
        self.average, self.segment = shares(state["average"]), shares(state["segment"])
        self.segment_steps, self.segment_first = state["segment_steps"], state["segment_first"]
        self.pending = {int(index): {**segment, "weights": shares(segment["weights"])}
                        for index, segment in state["pending"].items()}
        self.segments = state["segments"]
        self.valley = LossValley.from_state(state["valley"])
        self.finished = state["finished"]
        self.records = state["records"]
