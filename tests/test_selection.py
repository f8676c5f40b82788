"""The model-selection rules (rsc_dist/core/selection.py) on hand-made evaluation histories."""

import pytest

from rsc_dist.core import selection
from rsc_dist.trainer.evaluation import summarize_evaluation
from rsc_dist.trainer.state import TrainState


def record(step, val, target, counts=(90, 10)):
    """An evaluation: source domains big/small with val accuracies ``val`` and ``counts`` samples."""
    per_domain = {d: a for d, a, n in zip(("big", "small"), val, counts) if n}
    return {"step": step, "val_per_domain": per_domain, "val_n": dict(zip(("big", "small"), counts)),
            "target_acc": {"t": target}, "target_top5": {"t": 1.0}, "target_n": {"t": 50}}


# big has 90 val samples, small 10: the pooled accuracy follows big, the mean weighs both alike.
HISTORY = [record(1, (0.50, 0.90), 0.30),   # pooled 0.54, mean 0.70
           record(2, (0.60, 0.10), 0.60),   # pooled 0.55, mean 0.35
           record(3, (0.40, 0.80), 0.20),   # pooled 0.44, mean 0.60
           record(4, (0.45, 0.50), 0.60)]   # pooled 0.455, mean 0.475 (target ties step 2)


def test_mean_and_pooled_are_the_two_different_rules():
    assert selection.source_val_pooled(HISTORY[0]) == pytest.approx(0.54)
    assert selection.source_val_mean(HISTORY[0]) == pytest.approx(0.70)
    assert selection.select(HISTORY, "source_val_pooled")["step"] == 2
    assert selection.select(HISTORY, "source_val_mean")["step"] == 1
    assert selection.select(HISTORY, "last")["step"] == 4
    assert selection.select(HISTORY, "oracle")["step"] == 2  # tie with step 4: the earliest wins


def test_ties_go_to_the_earliest_evaluation():
    same = [record(s, (0.5, 0.5), 0.1 * s) for s in (1, 2, 3)]
    for rule in ("source_val_mean", "source_val_pooled"):
        assert selection.select(same, rule)["step"] == 1


def test_a_source_without_validation_has_no_mean_and_is_never_chosen():
    missing = record(5, (0.99, 0.0), 0.9, counts=(90, 0))
    assert selection.source_val_mean(missing) is None
    assert selection.source_val_pooled(missing) == pytest.approx(0.99)  # pooled still counts big
    assert selection.select(HISTORY + [missing], "source_val_mean")["step"] == 1
    with pytest.raises(selection.SelectionError, match="every source domain"):
        selection.select([missing], "source_val_mean")
    nothing = record(1, (0, 0), 0.5, counts=(0, 0))
    with pytest.raises(selection.SelectionError, match="no evaluation has source validation"):
        selection.select([nothing], "source_val_pooled")
    with pytest.raises(selection.SelectionError, match="unknown selection rule 'best'"):
        selection.select(HISTORY, "best")


def test_older_records_without_counts():
    """Schema 2 kept the pooled accuracy and the per-domain accuracies, no counts."""
    old = [{"step": 1, "val_acc": 0.54, "val_per_domain": {"big": 0.5, "small": 0.9}, "target_acc": {"t": 0.3}},
           {"step": 2, "val_acc": 0.55, "val_per_domain": {"big": 0.6, "small": 0.1}, "target_acc": {"t": 0.6}}]
    assert selection.select(old, "source_val_pooled")["step"] == 2
    assert selection.select(old, "source_val_mean")["step"] == 1


def test_record_evaluation_never_keeps_an_unscored_first_evaluation():
    """Planted defect: with no source validation (val acc None) the FIRST evaluation stayed "best"."""
    state = TrainState()
    no_val = {"step": 1, "val_acc": None, "val_per_domain": {}, "val_n": {"big": 0}, "target_acc": {"t": 0.1}}
    assert state.record_evaluation(no_val, "source_val_pooled") is False and state.best == {}
    assert state.record_evaluation(HISTORY[0], "source_val_pooled") is True and state.best["step"] == 1
    state = TrainState()
    for evaluation in HISTORY:
        state.record_evaluation(evaluation, "last")
    assert state.best["step"] == 4 and [e["step"] for e in state.history] == [1, 2, 3, 4]
    state = TrainState()
    chosen = [state.record_evaluation(e, "source_val_mean") for e in HISTORY]
    assert chosen == [True, False, False, False] and state.best["step"] == 1


def test_summarized_records_list_every_source_and_target_with_its_count():
    import torch

    domains = ("big", "small", "t")
    counts = {"val": torch.tensor([[45.0, 0, 0], [80, 0, 0], [90, 0, 0], [180, 0, 0]], dtype=torch.float64),
              "target": torch.tensor([[0, 0, 10.0], [0, 0, 40], [0, 0, 50], [0, 0, 75]], dtype=torch.float64)}
    summary = summarize_evaluation(counts, domains, 7, ("big", "small"), ("t",))
    assert summary["val_n"] == {"big": 90, "small": 0} and summary["target_n"] == {"t": 50}
    # summed cross-entropy / samples; the mean over sources needs every source (as val_acc_mean)
    assert summary["val_loss"] == pytest.approx(2.0) and summary["val_loss_per_domain"] == {"big": 2.0}
    assert summary["val_loss_mean"] is None
    assert summary["val_acc"] == pytest.approx(0.5) and summary["val_acc_mean"] is None
    assert summary["target_acc"] == {"t": pytest.approx(0.2)} and summary["target_top5"] == {"t": pytest.approx(0.8)}
    from rsc_dist.core import contracts

    assert contracts.layout_problems(summary, contracts.EVALUATION_RECORD) == []


def test_a_checkpoint_from_before_train_selection_continues_under_the_pooled_rule():
    """Such checkpoints chose best/ by the pooled accuracy: resuming under that rule is the same
    run; under another rule it is a listed change (refused without --resume force)."""
    from rsc_dist.trainer.run import resume_differences

    order = {"order_version": 2, "global_batch": 8}
    old = TrainState(data_order=dict(order), settings={"optim.lr": 0.01})
    same = {"data_order": order, "settings": {"optim.lr": 0.01, "train.selection": "source_val_pooled"}}
    assert resume_differences(old, same) == []
    other = {"data_order": order, "settings": {"optim.lr": 0.01, "train.selection": "source_val_mean"}}
    assert resume_differences(old, other) == ["train.selection: 'source_val_pooled' -> 'source_val_mean'"]
    # Settings added later (DomainBed's holdout and dropout) at the values those runs computed with.
    later = {"data_order": order, "settings": {**same["settings"], "data.holdout_fraction": 0.0,
                                                "model.dropout": 0.0, "data.holdout_seed": 0}}
    assert resume_differences(TrainState(data_order=dict(order), settings={"optim.lr": 0.01}), later) == []
    changed = {"data_order": order, "settings": {**later["settings"], "model.dropout": 0.1}}
    assert resume_differences(TrainState(data_order=dict(order), settings={"optim.lr": 0.01}), changed) == [
        "model.dropout: 0.0 -> 0.1"]
