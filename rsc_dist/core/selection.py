"""Model selection: which evaluation of a run is reported as "best".

Pure functions over evaluation records (the entries of results.json's ``history``, layout in
rsc_dist/core/contracts.py), so the trainer (choosing checkpoints/best/ as it goes) and
``python -m rsc_dist.results --selection RULE`` (choosing after the fact) apply the same rules:

    source_val_mean    DomainBed's training-domain validation: the MEAN over the source domains
                       of each one's held-out validation accuracy
    source_val_pooled  the released code's rule: the pooled source-validation accuracy, correct /
                       total over all source validation samples (large domains weigh more)
    last               the last evaluation
    oracle             the evaluation with the best mean target accuracy. It looks at the test
                       domain, so it is never a training-time rule and is labelled wherever shown.

Two more rules compare the trials of a sweep (rsc_dist.results.sweep_select) as DomainBed's
model_selection.py does; neither chooses within one run on its own:

    domainbed_oracle   DomainBed's "test-domain validation (oracle)": each run's LAST evaluation;
                       trials compared by the accuracy on the target's out-split (a holdout,
                       data.holdout_fraction), the in-split reported. Labelled ORACLE.
    leave_one_domain_out  DomainBed's "leave-one-domain-out cross-validation": at each step, the
                       mean over the other domains j of the run holding out (target, j)'s accuracy
                       on j; it needs a sweep with target_pairs.

Ties: the earliest evaluation wins (a later one must be strictly better to replace it).
An evaluation a rule cannot score (no source validation samples, or a source domain without any
for the mean) is never chosen by it; when none can be scored the rule has no choice
(``SelectionError``), never a silent fallback to another rule.
"""

from __future__ import annotations

import statistics

RUN_RULES = ("source_val_mean", "source_val_pooled", "last", "oracle")  # choose within one run
SWEEP_RULES = ("domainbed_oracle", "leave_one_domain_out")  # need a sweep's trials (and pairs)
RULES = RUN_RULES + SWEEP_RULES
TRAINING_RULES = ("source_val_mean", "source_val_pooled", "last")  # what train.selection accepts
NEEDS_SOURCE_VAL = ("source_val_mean", "source_val_pooled")
ORACLE = "oracle"
ORACLES = ("oracle", "domainbed_oracle")  # rules that look at the test domain

# How reports name each rule (an oracle's label says it is one).
LABELS = {
    "source_val_mean": "training-domain validation (best mean source-val step, DomainBed)",
    "source_val_pooled": "best source-val step (pooled sources, released code)",
    "last": "last step",
    "oracle": "ORACLE: best target step (test-domain selection, not a valid DG result)",
    "domainbed_oracle": "ORACLE: DomainBed's test-domain validation (last step, trials by the target's "
                        "out-split; not a valid DG result)",
    "leave_one_domain_out": "leave-one-domain-out cross-validation (DomainBed)",
}


class SelectionError(ValueError):
    """A rule that cannot choose from the given history; the message says why."""


def source_val_mean(evaluation: dict) -> float | None:
    """Mean over source domains of their validation accuracy; None when any source has no
    validation sample (the mean would silently drop that domain)."""
    per_domain = evaluation.get("val_per_domain") or {}
    counts = evaluation.get("val_n")
    if counts is not None:  # schema 3: every source is listed, with its count (0 allowed)
        if not counts or any(n <= 0 or d not in per_domain for d, n in counts.items()):
            return None
        return statistics.fmean(per_domain[d] for d in counts)
    # Older records list only the sources that had validation samples.
    return statistics.fmean(per_domain.values()) if per_domain else None


def source_val_pooled(evaluation: dict) -> float | None:
    """Correct / total over all source validation samples; None without any."""
    per_domain = evaluation.get("val_per_domain") or {}
    counts = evaluation.get("val_n")
    if counts is not None:
        total = sum(n for d, n in counts.items() if d in per_domain)
        return sum(per_domain[d] * counts[d] for d in counts if d in per_domain) / total if total else None
    return evaluation.get("val_acc")  # older records: the pooled accuracy as stored


def target_mean(evaluation: dict) -> float | None:
    """Mean top-1 accuracy over the target domains (what the oracle maximizes)."""
    accs = evaluation.get("target_acc") or {}
    return statistics.fmean(accs.values()) if accs else None


def target_out_mean(evaluation: dict) -> float | None:
    """Mean top-1 accuracy over the targets' out-splits (what DomainBed's oracle compares trials by);
    None without a holdout."""
    accs = evaluation.get("target_out_acc") or {}
    return statistics.fmean(accs.values()) if accs else None


SCORES = {"source_val_mean": source_val_mean, "source_val_pooled": source_val_pooled, "oracle": target_mean}


def check_rule(rule: str, allowed: tuple[str, ...] = RULES) -> str:
    if rule not in allowed:
        raise SelectionError(f"unknown selection rule {rule!r}; choose one of {', '.join(allowed)}")
    return rule


def score(rule: str, evaluation: dict) -> float | None:
    """The value the rule maximizes for one evaluation (None: the rule cannot score it; for
    "last" the step)."""
    check_rule(rule, RUN_RULES)
    if rule == "last":
        return evaluation.get("step")
    return SCORES[rule](evaluation)


def trial_score(rule: str, evaluation: dict) -> float | None:
    """What trials are compared by, for the evaluation ``rule`` picked in a run (what a W&B
    sweep maximizes: never the target accuracy, except for the labelled oracles).
    leave_one_domain_out's score needs other runs: rsc_dist.results.sweep_select computes it."""
    if rule in ("last", "leave_one_domain_out"):  # last: training-domain validation across trials
        return source_val_mean(evaluation)
    if rule == "domainbed_oracle":
        return target_out_mean(evaluation)
    return score(rule, evaluation)


def replaces(rule: str, candidate: dict, incumbent: dict | None) -> bool:
    """Whether ``candidate`` (a later evaluation) becomes the choice over ``incumbent``
    (the choice so far, None or {} when there is none). Earliest wins ties."""
    value = score(rule, candidate)
    if value is None:
        return False
    if not incumbent:
        return True
    if rule == "last":
        return True
    previous = score(rule, incumbent)
    return previous is None or value > previous


def select(history: list[dict], rule: str) -> dict:
    """The evaluation ``rule`` chooses from a run's history (in evaluation order);
    domainbed_oracle takes the last one (its trials are compared by the out-split)."""
    check_rule(rule)
    if rule == "leave_one_domain_out":
        raise SelectionError("leave_one_domain_out scores a step with the runs that hold out the target and one "
                             "other domain: point rsc_dist.results at a sweep with target_pairs")
    if rule == "domainbed_oracle":
        rule = "last"
    chosen: dict | None = None
    for evaluation in history:
        if replaces(rule, evaluation, chosen):
            chosen = evaluation
    if chosen is None:
        if not history:
            raise SelectionError("no evaluation in the history")
        why = {"source_val_mean": "no evaluation has validation samples from every source domain",
               "source_val_pooled": "no evaluation has source validation samples",
               "oracle": "no evaluation has target accuracies",
               "last": "no evaluation has a step"}[rule]
        raise SelectionError(f"selection {rule}: {why}")
    return chosen


def sources_without_validation(val_counts: dict[str, int]) -> list[str]:
    """Source domains with 0 validation samples (a rule in NEEDS_SOURCE_VAL cannot run)."""
    return [domain for domain, n in val_counts.items() if n <= 0]
