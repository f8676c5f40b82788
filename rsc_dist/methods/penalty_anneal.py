"""The penalty schedule IRM and VREx share (DomainBed's ``*_penalty_anneal_iters``): the penalty
weighs 1 for the first ``anneal_steps`` steps and ``penalty_weight`` from then on, and the
optimizer's state is reset at the switch.

DomainBed re-creates its Adam optimizer at the switch ("because it doesn't like the sharp jump
in gradient magnitudes"); here the state is cleared in place (``StepRunner.reset_optimizer_state``:
momenta and step counts, as a new optimizer has), which is the same for Adam and SGD, keeps the
learning-rate schedule, and works under DDP and DeepSpeed alike. The weight is a draw, a pure
function of the step, so every rank and a resumed run use the same one, and a run resumed at
the switch resets the state it loaded.
"""

from __future__ import annotations

from rsc_dist.methods.base import Method

GRAD_ACCUM_REFUSAL = ("its penalty is a non-linear function of the per-domain statistics of the whole batch of "
                      "an update; accumulated micro-batches would each compute their own")


class AnnealedPenaltyMethod(Method):
    """A method whose Section has ``penalty_weight`` and ``anneal_steps``."""

    grad_accum_refusal = GRAD_ACCUM_REFUSAL

    @classmethod
    def sweep_space(cls, preset):
        # DomainBed: weight 10^U(-1, 5), anneal int(10^U(0, 4)) steps, for both IRM and VREx.
        return {f"{cls.name}.penalty_weight": {"log_uniform": [1e-1, 1e5]},
                f"{cls.name}.anneal_steps": {"int_log_uniform": [1, 10**4]}}

    def draws(self, step, steps_per_epoch, sample_ids):
        annealed = step >= self.settings.anneal_steps
        return {"penalty_weight": self.settings.penalty_weight if annealed else 1.0}

    def train_step(self, runner, batch, draws):
        if runner.step == self.settings.anneal_steps:
            runner.reset_optimizer_state()
        return super().train_step(runner, batch, draws)
