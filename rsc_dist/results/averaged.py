"""The rows of an averaged model: a run trained with ``train.averaging`` is read as two runs,
its own trained model ("ERM") and its averaged model ("ERM + SWAD"), each with its best, last
and history, so every table, CSV row and --selection rule treats the average like any run.

A run whose average has no evaluation (SWAD found no loss valley) gives no averaged row; the
reason, from results.json's ``averaged.note``, is printed on stderr so that a missing seed in
the averaged row is never silent.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rsc_dist.results.tables import ResultsError, Run, parse_run, read_document


def averaged_document(data: dict) -> dict | None:
    """The run's document with its averaged model's evaluations in place of the trained
    model's (None: no averaged model with an evaluation)."""
    block = data.get("averaged")
    if not isinstance(block, dict) or not block.get("history"):
        return None
    return {**data, "best": block.get("best"), "last": block.get("last") or block["history"][-1],
            "history": block["history"], "averaged": None, "variant": block.get("label") or block.get("kind")}


def load_runs(path: Path, rule: str | None = None) -> list[Run]:
    """The run of one results.json, and its averaged model's run when it has one."""
    data = read_document(path)
    runs = [parse_run(path, data, rule)]
    block = data.get("averaged")
    if block is not None and not isinstance(block, dict):
        raise ResultsError(f"{path}: 'averaged' must be an object or null; got {block!r:.80}")
    averaged = averaged_document(data)
    if averaged is not None:
        runs.append(parse_run(Path(f"{path} (averaged: {averaged['variant']})"), averaged, rule))
    elif block:
        print(f"{path}: no {block.get('label', 'averaged')} row: {block.get('note') or 'no evaluation'}",
              file=sys.stderr)
    return runs
