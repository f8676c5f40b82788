"""The metric keys and what is logged under them: the x axis and summaries of every key, the
scalars of one evaluation, the per-domain result table and the end-of-run summary values.

Key layout (docs/wandb.md says how to read it): every metric is plotted against
``trainer/step`` (the trainer's optimizer-independent step; ``trainer/epoch`` beside it);
``train/*`` and ``perf/*`` every ``train.log_every_steps``; at each evaluation ``val/acc``,
``val/acc_mean``, ``val/acc_<source>``, ``target/acc_<target>``, ``target/top5_<target>``, the
domain-independent ``target/acc`` / ``target/top5`` (mean over the target domains) and
``best/val_acc``, ``best/target_acc`` (the target accuracy at the evaluation train.selection
chose so far; ``best/selection`` in the summary names the rule), ``best/selection_score`` (the
chosen evaluation's score by that rule, source validation: what a sweep compares runs by);
``rsc/masks`` images. The averaged model of ``train.averaging`` logs the same evaluation keys
under ``averaged/`` (``averaged/target/acc``, ``averaged/best/target_acc``, ...). At the end:
``results/per_domain`` (table; the averaged model's rows have its label in their role),
``results.json`` (run file) and, with ``wandb.log_model=best``, the best model as an artifact.
"""

from __future__ import annotations

import statistics

from rsc_dist.core import selection

STEP_KEY = "trainer/step"
EPOCH_KEY = "trainer/epoch"
TABLE_KEY = "results/per_domain"
SELECTION_SCORE_KEY = "best/selection_score"  # a W&B sweep's metric (rsc_dist.sweep.launch_wandb)
AVERAGED_PREFIX = "averaged/"  # the averaged model's keys (train.averaging)
TABLE_COLUMNS = ["domain", "role", "n", "best_top1", "best_top5", "last_top1", "last_top5",
                 "best_step", "last_step"]

# (glob or key, summary). Every key is plotted against trainer/step; specific keys first.
METRIC_SUMMARIES = (
    ("train/loss", "min,last"),
    ("train/acc", "max,last"),
    ("train/lr", "last"),
    ("train/masked_fraction", "mean,last"),
    ("perf/img_s", "mean,last"),
    ("perf/data_wait_fraction", "mean,last"),
    ("val/*", "max,last"),
    ("target/*", "max,last"),
    ("best/*", "last"),
    ("train/*", "last"),
    ("perf/*", "last"),
    ("rsc/*", None),
    ("averaged/*", "last"),
)


def define_metrics(run) -> None:
    """trainer/step as the x axis of every key, epoch beside it, summaries that mean something."""
    run.define_metric(STEP_KEY, summary="max")
    run.define_metric(EPOCH_KEY, step_metric=STEP_KEY, summary="last")
    for name, summary in METRIC_SUMMARIES:
        kwargs = {"summary": summary} if summary else {}
        run.define_metric(name, step_metric=STEP_KEY, **kwargs)


def mean_or_none(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def evaluation_metrics(evaluation: dict, best: dict | None = None) -> dict:
    """The scalars logged at one evaluation (best: the best evaluation so far, this one included)."""
    values = {}
    if evaluation.get("val_acc") is not None:
        values["val/acc"] = evaluation["val_acc"]
    if evaluation.get("val_acc_mean") is not None:
        values["val/acc_mean"] = evaluation["val_acc_mean"]
    values.update({f"val/acc_{d}": a for d, a in evaluation.get("val_per_domain", {}).items()})
    target_acc, target_top5 = evaluation.get("target_acc", {}), evaluation.get("target_top5", {})
    values.update({f"target/acc_{d}": a for d, a in target_acc.items()})
    values.update({f"target/top5_{d}": a for d, a in target_top5.items()})
    for key, per_domain in (("target/acc", target_acc), ("target/top5", target_top5)):
        if per_domain:
            values[key] = mean_or_none(per_domain.values())
    if best:
        for key in ("val_acc", "val_acc_mean"):
            if best.get(key) is not None:
                values[f"best/{key}"] = best[key]
        if best.get("target_acc"):
            values["best/target_acc"] = selection.target_mean(best)
            values.update({f"best/target_acc_{d}": a for d, a in best["target_acc"].items()})
        if best.get("step") is not None:
            values["best/step"] = best["step"]
    return values


def per_domain_rows(results: dict) -> list[list]:
    """The per-domain result table (TABLE_COLUMNS): source domains (their validation split),
    the pooled and the mean source validation, each target, and the mean over targets. n is
    the number of samples behind the row (the last evaluation's; evaluations count the same
    samples)."""
    best, last = results.get("best") or {}, results.get("last") or {}

    def counts(key: str) -> dict:
        return last.get(key) or best.get(key) or {}

    val_n, target_n = counts("val_n"), counts("target_n")
    steps = [best.get("step"), last.get("step")]
    rows = []
    for domain in results.get("sources", []):
        rows.append([domain, "source-val", val_n.get(domain),
                     (best.get("val_per_domain") or {}).get(domain), None,
                     (last.get("val_per_domain") or {}).get(domain), None, *steps])
    sources_n = sum(val_n.values()) if val_n else None
    for key, role in (("val_acc", "source-val (pooled)"), ("val_acc_mean", "source-val (mean)")):
        if best.get(key) is not None or last.get(key) is not None:
            rows.append(["all sources", role, sources_n, best.get(key), None, last.get(key), None, *steps])
    targets = list(results.get("targets", []))
    for domain in targets:
        rows.append([domain, "target", target_n.get(domain),
                     (best.get("target_acc") or {}).get(domain), (best.get("target_top5") or {}).get(domain),
                     (last.get("target_acc") or {}).get(domain), (last.get("target_top5") or {}).get(domain),
                     *steps])
    if targets:
        def avg(evaluation, key):
            values = [(evaluation.get(key) or {}).get(d) for d in targets]
            return mean_or_none(v for v in values if v is not None) if None not in values else None

        total = sum(target_n.get(d, 0) for d in targets) if all(d in target_n for d in targets) else None
        rows.append(["mean over targets", "target (mean)", total, avg(best, "target_acc"),
                     avg(best, "target_top5"), avg(last, "target_acc"), avg(last, "target_top5"), *steps])
    averaged = results.get("averaged") or {}
    if averaged.get("best"):  # the averaged model's rows, its label in the role
        own = {**results, "best": averaged["best"], "last": averaged.get("last"), "averaged": None}
        rows += [[domain, f"{role}, {averaged['label']}", *rest] for domain, role, *rest in per_domain_rows(own)]
    return rows


def rows_markdown(rows: list[list]) -> str:
    def cell(value):
        if value is None:
            return "—"
        return f"{100 * value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_values(results: dict) -> dict:
    """Domain-independent and per-domain end-of-run keys (W&B summary, TensorBoard scalars)."""
    values = {}
    for key in ("best", "last"):
        block = results.get(key) or {}
        if block.get("val_acc") is not None:
            values[f"{key}/val_acc"] = block["val_acc"]
        accs = block.get("target_acc") or {}
        if accs:
            values[f"{key}/target_acc"] = selection.target_mean(block)
        for domain, acc in accs.items():
            values[f"{key}/target_acc_{domain}"] = acc
        top5 = block.get("target_top5") or {}
        if top5:
            values[f"{key}/target_top5"] = mean_or_none(top5.values())
        if block.get("step") is not None:
            values[f"{key}/step"] = block["step"]
    if results.get("selection"):
        values["best/selection"] = results["selection"]  # which rule chose the best/* values
    averaged = results.get("averaged") or {}
    if averaged.get("best"):
        own = summary_values({"best": averaged["best"], "last": averaged.get("last")})
        values.update({f"{AVERAGED_PREFIX}{key}": value for key, value in own.items()})
    for key in ("steps", "throughput_img_s", "fingerprint"):
        if results.get(key) is not None:
            values[f"run/{key}"] = results[key]
    return values
