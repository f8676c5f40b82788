"""What a finished run reports: the RUN/results.json document and the console accuracy table."""

from __future__ import annotations

from pathlib import Path

from rsc_dist.config import Config, to_dict, trajectory_fingerprint
from rsc_dist.core.contracts import RESULTS_SCHEMA_VERSION
from rsc_dist.observe.identity import dataset_name
from rsc_dist.observe.meter import Meter
from rsc_dist.trainer.checkpoints import BEST_RELATIVE


def results_document(config: Config, plan, state, meter: Meter, run_dir: Path | None = None, *,
                     provenance: dict) -> dict:
    """RUN/results.json (layout: rsc_dist/core/contracts.py, RESULTS_LAYOUT); run_dir decides
    best_checkpoint; ``provenance``: rsc_dist.observe.provenance.provenance_record."""
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
        "best": state.best or None,
        "last": state.last,
        "best_checkpoint": best_checkpoint,
        "steps": state.step,
        "throughput_img_s": float(meter.throughput),
        "history": state.history,
        "forced_resumes": state.forced_resumes,
        "provenance": provenance,
    }


def format_accuracy_table(plan, state) -> str:
    rule = plan.config.train.selection
    rows = [f"| domain | role | accuracy (best by {rule}: step {state.best.get('step')}) "
            f"| accuracy (last step {state.last.get('step')}) |", "|---|---|---|---|"]
    for domain in plan.sources:
        best = state.best.get("val_per_domain", {}).get(domain)
        last = state.last.get("val_per_domain", {}).get(domain)
        rows.append(f"| {domain} | source (val) | {_pct(best)} | {_pct(last)} |")
    for domain in plan.targets:
        rows.append(f"| {domain} | target | {_pct(state.best.get('target_acc', {}).get(domain))} "
                    f"| {_pct(state.last.get('target_acc', {}).get(domain))} |")
    return "\n".join(rows)


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.2f} %"
