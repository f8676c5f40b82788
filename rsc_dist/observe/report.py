"""What a finished run reports: the RUN/results.json document and the console accuracy table."""

from __future__ import annotations

from pathlib import Path

from rsc_dist.config import Config, to_dict, trajectory_fingerprint
from rsc_dist.core.contracts import BEST_RELATIVE, RESULTS_SCHEMA_VERSION
from rsc_dist.observe.identity import dataset_name
from rsc_dist.observe.meter import Meter


def results_document(config: Config, plan, state, meter: Meter, run_dir: Path | None = None, *,
                     provenance: dict, averaged: dict | None = None, init_fingerprint: str | None = None) -> dict:
    """RUN/results.json (layout: rsc_dist/core/contracts.py, RESULTS_LAYOUT); run_dir decides
    best_checkpoint; ``provenance``: rsc_dist.observe.provenance.provenance_record; ``averaged``:
    the averaged model's block (rsc_dist.trainer.averaged)."""
    best_checkpoint = None
    if run_dir is not None and (Path(run_dir) / BEST_RELATIVE).is_dir():
        best_checkpoint = BEST_RELATIVE
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "config": to_dict(config),
        "fingerprint": trajectory_fingerprint(config, plan.world_size),
        "algorithm": config.algorithm,
        "dataset": dataset_name(config, plan),
        "arch": config.model.arch,
        "seed": config.run.seed,
        "targets": list(plan.targets),
        "sources": list(plan.sources),
        "selection": config.train.selection,
        "protocol": config.run.protocol,
        "holdout": plan.holdout.record() if plan.holdout else None,
        "world_size": plan.world_size,
        "global_batch": plan.global_batch,
        "best": state.best or None,
        "last": state.last,
        "best_checkpoint": best_checkpoint,
        "steps": state.step,
        "throughput_img_s": float(meter.throughput),
        "history": state.history,
        "forced_resumes": state.forced_resumes,
        "init_fingerprint": init_fingerprint,
        "averaged": averaged,
        "variant": None,
        "soup": None,
        "provenance": provenance,
    }


def format_accuracy_table(plan, state, averaged: dict | None = None) -> str:
    """The console table: the trained model's best and last evaluations, then the averaged
    model's (train.averaging) when there is one."""
    rule = plan.config.train.selection
    text = _table(plan, state.best, state.last, f"best by {rule}")
    if averaged:
        if averaged.get("best"):
            text += f"\n\n{averaged['label']} (averaged weights):\n" + _table(
                plan, averaged["best"], averaged.get("last") or {}, f"best by {rule}")
        elif averaged.get("note"):
            text += f"\n\n{averaged['label']}: {averaged['note']}"
    return text


def _table(plan, best: dict, last: dict, chosen: str) -> str:
    rows = [f"| domain | role | accuracy ({chosen}: step {best.get('step')}) "
            f"| accuracy (last step {last.get('step')}) |", "|---|---|---|---|"]
    for domain in plan.sources:
        rows.append(f"| {domain} | source (val) | {_pct(best.get('val_per_domain', {}).get(domain))} "
                    f"| {_pct(last.get('val_per_domain', {}).get(domain))} |")
    for domain in plan.targets:
        rows.append(f"| {domain} | target | {_pct(best.get('target_acc', {}).get(domain))} "
                    f"| {_pct(last.get('target_acc', {}).get(domain))} |")
    return "\n".join(rows)


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f} %"
