"""``TrainState``: a run's progress that is not a tensor of the model or optimizer, saved in every
checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field

from rsc_dist.core import selection
from rsc_dist.observe import provenance


@dataclass
class TrainState:
    """Everything about a run's progress that is not a tensor of the model or optimizer."""

    step: int = 0  # global batches trained on (the data position derives from it)
    data_order: dict = field(default_factory=dict)  # plan.data_order() at save time
    settings: dict = field(default_factory=dict)  # config.trajectory_settings at save time (what it hashes)
    forced_resumes: list = field(default_factory=list)  # what --resume force continued despite
    best: dict = field(default_factory=dict)  # the evaluation train.selection chose so far ({}: none)
    last: dict = field(default_factory=dict)  # the most recent evaluation
    history: list = field(default_factory=list)
    # Each start of the run: step range, ranks, threads, hosts, times (observe.provenance.new_segment).
    segments: list = field(default_factory=list)

    def state_dict(self) -> dict:
        return {"step": self.step, "best": self.best, "last": self.last, "history": self.history,
                "data_order": self.data_order, "settings": self.settings,
                "forced_resumes": self.forced_resumes, "segments": self.segments}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.best, self.last = state["step"], state["best"], state["last"]
        self.history = state["history"]
        # Checkpoints of the rank-dependent order (before order_version 2) have "stream_layout".
        self.data_order = state.get("data_order", {"order_version": 1, **state.get("stream_layout", {})})
        self.settings = state.get("settings", {})
        self.forced_resumes = state.get("forced_resumes", [])
        # Checkpoints from before segments were recorded: their steps as one segment of unknown layout.
        self.segments = state.get("segments") or ([provenance.unrecorded_segment(self.step)] if self.step else [])

    def reach(self, step: int) -> None:
        """The current segment has got to ``step`` (call before a checkpoint is saved, and at the end)."""
        if self.segments:
            self.segments[-1].update(end_step=step, ended=provenance.now())

    def record_evaluation(self, evaluation: dict, rule: str = "source_val_pooled") -> bool:
        """Store an evaluation; True when ``rule`` (rsc_dist.selection) makes it the new best.
        An evaluation the rule cannot score (no source validation) never becomes the best."""
        self.last = evaluation
        self.history.append(evaluation)
        if selection.replaces(rule, evaluation, self.best):
            self.best = evaluation
            return True
        return False
