"""What the trainer promises to the programs around it (launchers, SLURM scripts, results.py).

Defined once here; the shell scripts in launch/slurm/ repeat the literals (shell cannot import
Python), and tests/test_contracts.py checks that they are equal.

Exit codes of ``rsc_dist.train`` (and ``rsc_dist.evaluate``):
    0   finished (or already finished)
    1   an unexpected error (a bug, a crashed rank): the traceback is printed
    2   bad configuration, data or checkpoint; the last line names the file, key or value
    3   non-finite loss; the last good checkpoint is kept
    75  stopped on request (SIGTERM/SIGUSR1, train.stop_at_step) after saving a checkpoint;
        rerun the same command to resume (EX_TEMPFAIL); a stop that arrives once the last
        step is done ends the run as finished (0)

A stop that should be resumed is also announced by the file ``RUN/preempted.json`` (what the
launcher itself exits with depends on how the stop reached it; see launch/README.md):
    {"step": <int>, "reason": "<SIGTERM | SIGUSR1 | train.stop_at_step=N>"}

``RUN/results.json``, schema version 4: RESULTS_LAYOUT below is its one description (key ->
type and meaning); tests/test_contracts.py checks a trainer-written file against it, and
rsc_dist.results reads versions 1 to 4. Every evaluation (``best``, ``last`` and each entry of
``history``) is an EVALUATION_RECORD, which keeps per-domain accuracies AND sample counts, so
any selection rule (rsc_dist/core/selection.py) can be applied after the fact. Accuracies are
fractions in [0, 1]. Version 4 added the keys marked "(v4)" below (``provenance``: what computed
the run, PROVENANCE_RECORD, with its SEGMENT_RECORDs); version 3 files lack them. Version 2 had no val_acc_mean/val_n/target_n/selection keys and a "num_samples" map
instead; version 1 had no "schema_version" key.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_NONFINITE = 3
EXIT_PREEMPTED = 75

# The run folder RUN as other programs find it (rsc_dist.evaluate, results, the sweeps, the SLURM
# scripts); rsc_dist/trainer/checkpoints.py names what lies inside RUN/CHECKPOINTS_DIR (checkpoint_STEP/,
# best/ and their files). tests/test_contracts.py pins these names: users' scripts rely on them.
PREEMPTED_MARKER = "preempted.json"
RESULTS_FILE = "results.json"
RESULTS_SCHEMA_VERSION = 4
CONFIG_FILE = "config.yaml"  # the resolved config (also inside RUN/checkpoints/best/)
CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"  # RUN/CHECKPOINTS_DIR/BEST_DIR: the weights train.selection chose (rsc_dist.evaluate reads it)
BEST_RELATIVE = f"{CHECKPOINTS_DIR}/{BEST_DIR}"  # what results.json records as "best_checkpoint"
BEST_AVERAGED_DIR = "best_averaged"  # the averaged model's chosen weights (train.averaging)
BEST_AVERAGED_RELATIVE = f"{CHECKPOINTS_DIR}/{BEST_AVERAGED_DIR}"  # results.json's averaged.best_checkpoint

# Types: int, float, str, bool, dict, list, "null" (JSON null), "{str: T}" (a map from names, e.g.
# domains, to T), "list[str]", "evaluation" (an EVALUATION_RECORD), "averaged" (an
# AVERAGED_RECORD), "segment", "provenance", and "list[R]" of such records; "a|b" = either.
EVALUATION_RECORD = {
    "step": ("int", "training steps done when evaluated"),
    "val_acc": ("float|null", "pooled source validation: correct / total over all source val samples"),
    "val_acc_mean": ("float|null", "mean over source domains of their val accuracy (DomainBed); "
                                   "null when a source domain has no val sample"),
    "val_per_domain": ("{str: float}", "val accuracy of each source domain that has val samples"),
    "val_n": ("{str: int}", "val samples of EVERY source domain (0 allowed)"),
    "target_acc": ("{str: float}", "top-1 on each target domain (all of its samples; with a holdout, its in-split)"),
    "target_top5": ("{str: float}", "top-5 on each target domain"),
    "target_n": ("{str: int}", "samples of every target domain (with a holdout: of its in-split)"),
    "target_out_acc": ("{str: float}", "(v4) top-1 on each target's out-split (data.holdout_fraction; what "
                                       "DomainBed's oracle selects by); {} without a holdout"),
    "target_out_n": ("{str: int}", "(v4) samples of each target's out-split; {} without a holdout"),
    "val_loss": ("float|null", "(v4) pooled source validation cross-entropy: summed over all source val "
                               "samples / their count"),
    "val_loss_mean": ("float|null", "(v4) mean over source domains of their mean val cross-entropy (what "
                                    "SWAD's loss-valley rule reads); null when a source has no val sample"),
    "val_loss_per_domain": ("{str: float}", "(v4) mean val cross-entropy of each source domain with val samples"),
}

# The averaged model of a run (train.averaging; rsc_dist/averaging): results.json's "averaged".
AVERAGED_RECORD = {
    "kind": ("str", "(v4) ema | swa | swad"),
    "label": ("str", "(v4) how tables name its rows after the method's name (\"ERM + SWAD\")"),
    "best": ("evaluation|null", "(v4) the averaged model's evaluation that train.selection chose (swad: "
                                "its one evaluation, of the final average); null when there is none"),
    "last": ("evaluation|null", "(v4) its last evaluation"),
    "history": ("list[evaluation]", "(v4) every evaluation of the averaged model (ema, swa: at the run's "
                                    "evaluations once averaging has started; swad: one)"),
    "best_checkpoint": ("str|null", "(v4) RUN-relative folder with best's averaged weights "
                                    "(checkpoints/best_averaged), or null"),
    "window": ("dict", "(v4) what was averaged: steps averaged and, per kind, decay (ema), first step "
                       "(swa, swad), last step, segments and threshold (swad)"),
    "note": ("str|null", "(v4) why there is no averaged model (swad: no loss valley was found)"),
}

# A stretch of a run between a start (or resume) and the last checkpoint it saved (the run's end
# for the last one); the segments of a run tile its steps. "null" values: a checkpoint written
# before segments were recorded (its steps 0..end_step, layout unknown).
SEGMENT_RECORD = {
    "start_step": ("int", "(v4) the step this start resumed from (0: a fresh start)"),
    "end_step": ("int", "(v4) the step of its last checkpoint (the last segment: the run's last step)"),
    "world_size": ("int|null", "(v4) ranks"),
    "threads_per_rank": ("int|list|null", "(v4) CPU intra-op threads of each rank (one number when equal)"),
    "device_type": ("str|null", "(v4) cpu | cuda"),
    "hosts": ("list[str]|null", "(v4) the hosts its ranks ran on"),
    "commit": ("str|null", "(v4) the code's git commit"),
    "started": ("str|null", "(v4) ISO 8601 time of the start"),
    "ended": ("str|null", "(v4) ISO 8601 time of its last checkpoint (or of the run's end)"),
}

# What computed the run (rsc_dist/observe/provenance.py); the W&B run config carries the same.
PROVENANCE_RECORD = {
    "world_size": ("int", "(v4) ranks of the start that finished the run"),
    "local_ranks": ("int", "(v4) ranks on the first rank's node"),
    "nodes": ("int", "(v4) hosts the ranks ran on"),
    "hosts": ("list[str]", "(v4) their names"),
    "device_type": ("str", "(v4) cpu | cuda"),
    "devices": ("{str: int}", "(v4) device name (a GPU's, or 'cpu: ' and the CPU's model) -> ranks on it"),
    "threads_per_rank": ("int|list", "(v4) CPU intra-op threads of each rank (one number when equal; "
                                     "it changes a CPU run's float rounding)"),
    "threads_rule": ("str", "(v4) where that count came from: train.cpu_threads or cores / ranks per node"),
    "versions": ("{str: str|null}", "(v4) python, torch, torchvision, accelerate, deepspeed, webdataset, timm, "
                                    "numpy, wandb (null: not installed) and cuda (torch's; null: a CPU build)"),
    "commit": ("str|null", "(v4) git commit of the code (null outside a git checkout)"),
    "dirty": ("bool|null", "(v4) the checkout had local changes: a changed tracked file or an untracked "
                           "file under rsc_dist/, data_prep/ or launch/"),
    "started": ("str|null", "(v4) ISO 8601 start of the first segment (null: not recorded)"),
    "ended": ("str", "(v4) ISO 8601 time results.json was written"),
    "segments": ("list[segment]", "(v4) every start of the run in order (SEGMENT_RECORD); one unless it "
                                  "was stopped and resumed, possibly on another number of ranks"),
}

RESULTS_LAYOUT = {
    "schema_version": ("int", "RESULTS_SCHEMA_VERSION"),
    "config": ("dict", "the resolved config (nested)"),
    "fingerprint": ("str", "hash of the settings that define the trajectory (part of the default run folder)"),
    "algorithm": ("str", "the method (rsc_dist.methods; `python -m rsc_dist.train --help` lists them)"),
    "dataset": ("str", "data.dataset or the manifest's name"),
    "arch": ("str", "model.arch"),
    "seed": ("int", "run.seed"),
    "targets": ("list[str]", "held-out domains"),
    "sources": ("list[str]", "training domains"),
    "selection": ("str", "the rule that chose best (train.selection; rsc_dist/core/selection.py)"),
    "protocol": ("str", "(v4) run.protocol: the published protocol the settings follow (rsc_dist/core/protocols.py)"),
    "holdout": ("dict|null", "(v4) the load-time validation split (data.holdout_fraction): {fraction, seed, "
                             "in_n: {domain: int}, out_n: {domain: int}, out_digest}; null: the shards' own split"),
    "world_size": ("int", "(v4) processes that trained the run (its last start)"),
    "global_batch": ("int", "(v4) samples per step over all processes and source domains"),
    "best": ("evaluation|null", "the evaluation the selection rule chose (null: it could choose none)"),
    "last": ("evaluation", "the last evaluation"),
    "best_checkpoint": ("str|null", "RUN-relative folder with best's weights (checkpoints/best), or null"),
    "steps": ("int", "training steps done"),
    "throughput_img_s": ("float", "training images per second, all ranks"),
    "history": ("list[evaluation]", "every evaluation, in order"),
    "forced_resumes": ("list", "what each --resume force continued despite: {step, changes}"),
    "init_fingerprint": ("str|null", "(v4) hash of the weights the network started from (backbone and head, "
                                     "before the first step): rsc_dist.soup averages only runs whose hashes agree"),
    "averaged": ("averaged|null", "(v4) the averaged model of train.averaging (AVERAGED_RECORD); null without"),
    "variant": ("str|null", "(v4) what the document reports when it is not a run's own trained model: "
                            "\"uniform soup of N runs\", \"greedy soup of K of N runs\" (rsc_dist.soup); "
                            "tables label its rows METHOD + VARIANT"),
    "soup": ("dict|null", "(v4) how a soup was made (rsc_dist.soup): kind, rule, ingredients with their "
                          "scores and whether each was kept; null for a trained run"),
    "provenance": ("provenance", "(v4) ranks, threads, devices, versions, code, times, segments "
                                 "(PROVENANCE_RECORD)"),
}


def layout_problems(document: dict, layout: dict = RESULTS_LAYOUT, where: str = "") -> list[str]:
    """Where ``document`` differs from ``layout`` (missing or extra keys, wrong types); [] if none."""
    if not isinstance(document, dict):
        return [f"{where or 'document'}: expected an object, got {type(document).__name__}"]
    problems = [f"{where}{key}: missing" for key in layout if key not in document]
    problems += [f"{where}{key}: not in the layout" for key in document if key not in layout]
    for key, (kind, _meaning) in layout.items():
        if key in document:
            problems += _type_problems(document[key], kind, f"{where}{key}")
    return problems


def _alternatives(kind: str) -> list[str]:
    """"a|b|{str: c|d}" -> ["a", "b", "{str: c|d}"]: split at the "|"s outside braces."""
    options, depth, start = [], 0, 0
    for i, char in enumerate(kind):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "|" and depth == 0:
            options.append(kind[start:i])
            start = i + 1
    return options + [kind[start:]]


def _type_problems(value, kind: str, where: str) -> list[str]:
    options = _alternatives(kind)
    found = []
    for option in options:
        found = _one_type_problems(value, option, where)
        if not found:
            return []
    return found if len(options) == 1 else [f"{where}: expected {kind}, got {value!r:.80}"]


def _one_type_problems(value, kind: str, where: str) -> list[str]:
    def number(v, allowed):
        return isinstance(v, allowed) and not isinstance(v, bool)

    simple = {"int": lambda v: number(v, int), "float": lambda v: number(v, (int, float)),
              "str": lambda v: isinstance(v, str), "bool": lambda v: isinstance(v, bool),
              "dict": lambda v: isinstance(v, dict), "list": lambda v: isinstance(v, list),
              "null": lambda v: v is None}
    records = {"evaluation": EVALUATION_RECORD, "averaged": AVERAGED_RECORD, "segment": SEGMENT_RECORD,
               "provenance": PROVENANCE_RECORD}
    if kind in simple:
        return [] if simple[kind](value) else [f"{where}: expected {kind}, got {value!r:.80}"]
    if kind == "list[str]":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return [] if ok else [f"{where}: expected a list of strings, got {value!r:.80}"]
    if kind.startswith("{str: ") and kind.endswith("}"):
        if not isinstance(value, dict):
            return [f"{where}: expected {kind}, got {value!r:.80}"]
        return [p for k, v in value.items() for p in _type_problems(v, kind[6:-1], f"{where}.{k}")]
    if kind in records:
        return layout_problems(value, records[kind], f"{where}.")
    if kind.startswith("list[") and kind[5:-1] in records:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r:.80}"]
        return [p for i, v in enumerate(value) for p in layout_problems(v, records[kind[5:-1]], f"{where}[{i}].")]
    raise ValueError(f"unknown layout type {kind!r} at {where}")
