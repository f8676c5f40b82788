"""Average the runs of a sweep into model soups (DiWA, model soups) and evaluate them.

    python -m rsc_dist.soup SWEEP_OUT                          # uniform and greedy, per method, target and seed
    python -m rsc_dist.soup SWEEP_OUT --kind greedy --selection source_val_mean --methods erm
    python -m rsc_dist.soup SWEEP_OUT --across-seeds           # one soup of every trial and seed
    python -m rsc_dist.results SWEEP_OUT                       # soups are rows: "ERM + greedy soup of 8 runs"

For each method, target and trial seed of the sweep (SWEEP_OUT/sweep.json), the finished runs'
chosen weights (each run's checkpoints/best) are the ingredients:
- uniform: the mean of all of them;
- greedy (Wortsman et al. 2022, Algorithm 1): ordered by the selection rule's SOURCE validation
  score of each run's chosen evaluation, best first; each is kept when the soup with it scores
  at least as well on source validation. Target accuracy never decides anything.
BatchNorm statistics are recomputed on source training data (over the global batch) when the
runs' BatchNorm is not frozen. Each soup is evaluated like a run and written as a run folder,
SWEEP_OUT/soups/METHOD/TARGET/KIND-sSEED (results.json, config.yaml, checkpoints/best/), which
rsc_dist.results and rsc_dist.evaluate read like any run.

Runs can only be averaged when they started from the same weights: every run records the
fingerprint of its initial weights (results.json "init_fingerprint"); runs whose fingerprints
differ are refused, each named. Start every trial from one checkpoint (the sweep file's
``shared_init``, DiWA's shared linear-probe start) to make a sweep averageable.
Exit codes: 0 done, 2 a sweep, run or data problem (one line on stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch rsc_dist/soup.py` runs this as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dataclasses

import torch

from rsc_dist.averaging.batchnorm import recompute_batchnorm
from rsc_dist.averaging.soups import greedy_soup, uniform_average
from rsc_dist.config import flatten, load_config, save_config, to_dict
from rsc_dist.core import selection
from rsc_dist.core.contracts import CONFIG_FILE, EXIT_CONFIG, EXIT_OK, RESULTS_FILE, RESULTS_SCHEMA_VERSION
from rsc_dist.core.errors import UsageError
from rsc_dist.data.streams import error_line
from rsc_dist.observe import provenance
from rsc_dist.sweep.state import RECORD_FILE
from rsc_dist.trainer import build, checkpoints
from rsc_dist.trainer.averaged import source_batches
from rsc_dist.trainer.evaluation import evaluate, evaluation_autocast, summarize_evaluation
from rsc_dist.trainer.plan import DataPlan, data_root

KINDS = ("uniform", "greedy")
SOUPS_DIR = "soups"


class SoupError(UsageError):
    """A sweep, run or soup that cannot be made; the message names what is at fault."""


@dataclass(frozen=True)
class Ingredient:
    name: str
    folder: Path  # the run folder
    results: dict  # its results.json
    evaluation: dict  # the evaluation its best/ holds
    score: float  # the rule's source-validation score of that evaluation


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m rsc_dist.soup", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_out", type=Path, help="a sweep's folder (with sweep.json)")
    p.add_argument("--kind", choices=(*KINDS, "both"), default="both")
    p.add_argument("--selection", choices=selection.NEEDS_SOURCE_VAL,
                   help="the source-validation score that orders and accepts ingredients (default: the runs' "
                        "train.selection when it is one of these, else source_val_mean)")
    p.add_argument("--methods", nargs="+", metavar="M", help="only these methods")
    p.add_argument("--targets", nargs="+", metavar="T", help="only these targets")
    p.add_argument("--across-seeds", action="store_true",
                   help="one soup per method and target of every trial and seed (default: one per trial seed)")
    p.add_argument("--out", type=Path, help="where the soup folders go (default SWEEP_OUT/soups)")
    return p.parse_args(argv)


# -- the sweep's runs ---------------------------------------------------------------------------


def finished_runs(sweep_out: Path) -> list[dict]:
    """sweep.json's entries of the runs that finished (results.json present), with "path"."""
    record = Path(sweep_out) / RECORD_FILE
    try:
        entries = json.loads(record.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SoupError(f"{record}: cannot read the sweep record ({exc}); give a sweep's --out folder") from None
    return [{**entry, "path": Path(sweep_out) / entry["folder"]} for entry in entries
            if (Path(sweep_out) / entry["folder"] / RESULTS_FILE).is_file()]


def groups(runs: list[dict], across_seeds: bool) -> dict[tuple, list[dict]]:
    """{(method, target, seed or None): runs}, in a stable order."""
    out: dict[tuple, list[dict]] = {}
    for run in sorted(runs, key=lambda r: (r["method"], str(r["target"]), r["seed"], r["trial"])):
        key = (run["method"], run["target"], None if across_seeds else run["seed"])
        out.setdefault(key, []).append(run)
    return out


def check_same_start(runs: list[dict], documents: dict[str, dict]) -> str:
    """The runs' common initialization fingerprint; SoupError naming the runs when they differ."""
    by_start: dict[str | None, list[str]] = {}
    for run in runs:
        by_start.setdefault(documents[run["name"]].get("init_fingerprint"), []).append(run["name"])
    if None in by_start:
        raise SoupError(f"run(s) {', '.join(by_start[None])} record no initialization fingerprint (trained before "
                        "rsc_dist recorded one): they cannot be checked for a shared start; retrain them")
    if len(by_start) > 1:
        def start(name):
            config = documents[name].get("config") or {}
            pretrained = (config.get("model") or {}).get("pretrained")
            return f"model.pretrained={pretrained}" if pretrained else f"random init, run.seed={documents[name]['seed']}"

        listing = "; ".join(f"{', '.join(names)} start from {fingerprint} ({start(names[0])})"
                            for fingerprint, names in by_start.items())
        raise SoupError(f"these runs do not share an initialization, so their weights cannot be averaged: {listing}. "
                        "Start every trial from one checkpoint (the sweep file's shared_init) to average them")
    return next(iter(by_start))


def ingredients(runs: list[dict], documents: dict[str, dict], rule: str) -> list[Ingredient]:
    """The runs' chosen weights and scores, best score first (ties: by name)."""
    out = []
    for run in runs:
        best = run["path"] / checkpoints.BEST_RELATIVE
        try:
            evaluation = json.loads((best / checkpoints.EVALUATION_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise SoupError(f"{best}: no chosen weights with their evaluation ({exc})") from None
        value = selection.score(rule, evaluation)
        if value is None:
            raise SoupError(f"{best / checkpoints.EVALUATION_FILE}: selection {rule} cannot score it "
                            "(no source validation samples)")
        out.append(Ingredient(run["name"], run["path"], documents[run["name"]], evaluation, value))
    return sorted(out, key=lambda i: (-i.score, i.name))


def load_weights(ingredient: Ingredient) -> dict:
    from safetensors.torch import load_file

    path = ingredient.folder / checkpoints.BEST_RELATIVE / checkpoints.MODEL_FILE
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file: say which
        raise SoupError(f"{path}: cannot read the weights ({error_line(exc).splitlines()[0][:200]})") from None


# -- evaluating a soup --------------------------------------------------------------------------


class SoupEvaluator:
    """Evaluates averaged weights like the trainer evaluates a model: BatchNorm recomputed over
    the global batch when it is not frozen, every sample counted once across ranks."""

    def __init__(self, config, accelerator):
        self.config, self.accelerator = config, accelerator
        self.plan = DataPlan(config, data_root(config, accelerator.main_process_first), accelerator.num_processes)
        self.loaders = self.plan.eval_loaders(accelerator.process_index, accelerator.device.type == "cuda")

    def network(self, weights: dict):
        config, accelerator = self.config, self.accelerator
        network = build.evaluation_network(config, self.plan.manifest.num_classes, weights, accelerator.device,
                                           source="the soup's weights")
        if not config.model.freeze_bn:
            group = torch.distributed.group.WORLD if accelerator.num_processes > 1 else None
            recompute_batchnorm(network, source_batches(config, self.plan, accelerator, config.averaging.bn_batches),
                                group, lambda: evaluation_autocast(accelerator))
        return network

    def evaluate(self, weights: dict, roles: tuple[str, ...] = ("val", "target")) -> tuple[dict, object]:
        network = self.network(weights)
        loaders = {role: loader for role, loader in self.loaders.items() if role in roles}
        counts = evaluate(self.accelerator, network, loaders, self.config, len(self.plan.domains))
        return summarize_evaluation(counts, self.plan.domains, 0, self.plan.sources, self.plan.targets), network


def make_soup(kind: str, found: list[Ingredient], evaluator: SoupEvaluator, rule: str) -> tuple[dict, dict, object]:
    """(the soup's evaluation, its "soup" record, its network) for ``kind`` over ``found``."""
    weights = {i.name: load_weights(i) for i in found}
    trace = [{"name": i.name, "folder": str(i.folder), "score": i.score} for i in found]
    if kind == "uniform":
        kept = [i.name for i in found]
        for entry in trace:
            entry["kept"] = True
    else:
        def score(names):
            evaluation, _ = evaluator.evaluate(uniform_average([weights[n] for n in names]), roles=("val",))
            value = selection.score(rule, evaluation)
            if value is None:
                raise SoupError(f"selection {rule} cannot score a soup: the sources have no validation samples")
            return value

        kept, tried = greedy_soup([i.name for i in found], score)
        for entry, attempt in zip(trace, tried):
            entry.update(kept=attempt["kept"], soup_score=attempt["soup_score"])
    evaluation, network = evaluator.evaluate(uniform_average([weights[n] for n in kept]))
    record = {"kind": kind, "rule": rule, "candidates": len(found), "kept": len(kept), "ingredients": trace}
    return evaluation, record, network


def soup_document(kind: str, found: list[Ingredient], evaluation: dict, record: dict, seed: int, rule: str,
                  init: str, config, made_by: dict) -> dict:
    """The soup's results.json (rsc_dist/core/contracts.py, RESULTS_LAYOUT). ``made_by``: the
    provenance of this command (no training segments: a soup is averaged, not trained); the
    protocol, holdout and batch are the first ingredient's, which every ingredient shares."""
    lead = found[0].results
    fingerprint = hashlib.sha256(json.dumps([kind, rule, sorted(i.results.get("fingerprint", i.name) for i in found)])
                                 .encode()).hexdigest()[:16]
    shared = common_config([i.results.get("config") or {} for i in found])
    shared.setdefault("run", {}).update(output_dir=config.run.output_dir, name=config.run.name)
    return {
        "schema_version": RESULTS_SCHEMA_VERSION, "config": shared, "fingerprint": fingerprint,
        "algorithm": lead["algorithm"], "dataset": lead["dataset"], "arch": lead.get("arch", config.model.arch),
        "seed": seed, "targets": lead["targets"], "sources": lead["sources"], "selection": rule,
        "protocol": lead.get("protocol") or "custom", "holdout": lead.get("holdout"),
        "world_size": int(lead.get("world_size") or 1), "global_batch": int(lead.get("global_batch") or 0),
        "best": evaluation, "last": evaluation, "best_checkpoint": checkpoints.BEST_RELATIVE,
        "steps": max(int(i.results.get("steps") or 0) for i in found), "throughput_img_s": 0.0,
        "history": [evaluation], "forced_resumes": [], "init_fingerprint": init, "averaged": None,
        "variant": f"{kind} soup of {len(found)} runs", "soup": record, "provenance": made_by,
    }


def common_config(configs: list[dict]) -> dict:
    """The settings every ingredient shares; a setting they differ in (a searched learning
    rate) is null: the soup has no one value of it, and tables do not label its row with one."""
    flats = [flatten(config) for config in configs]
    keys = sorted(set().union(*flats))
    out: dict = {}
    for key in keys:
        values = [flat.get(key) for flat in flats]
        node = out
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = values[0] if all(v == values[0] for v in values) else None
    return out


def write_soup(folder: Path, document: dict, network, config, accelerator) -> None:
    """A run folder: results.json, config.yaml and checkpoints/best/ (the soup's weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoints.save_best(accelerator, None, folder, document["best"], to_dict(config),
                          state_dict=network.state_dict())
    if accelerator.is_main_process:
        save_config(config, folder / CONFIG_FILE)
        (folder / RESULTS_FILE).write_text(json.dumps(document, indent=2))


def soup_config(lead: Ingredient, folder: Path, name: str):
    """The leading ingredient's config (what the soup is evaluated with), from its run folder,
    naming the soup's folder."""
    path = lead.folder / CONFIG_FILE
    if not path.is_file():
        raise SoupError(f"{path}: the run's config is missing")
    config = load_config(str(path))
    preset = (lead.results.get("config") or {}).get("preset") or config.preset
    return dataclasses.replace(config, preset=preset,
                               run=dataclasses.replace(config.run, output_dir=str(folder), name=name))


def default_rule(documents: dict[str, dict]) -> str:
    rules = {d.get("selection") for d in documents.values()}
    rule = rules.pop() if len(rules) == 1 else None
    return rule if rule in selection.NEEDS_SOURCE_VAL else "source_val_mean"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = finished_runs(args.sweep_out)
        runs = [r for r in runs if (not args.methods or r["method"] in args.methods)
                and (not args.targets or r["target"] in args.targets)]
        if not runs:
            raise SoupError(f"no finished run under {args.sweep_out} matches (methods {args.methods or 'all'}, "
                            f"targets {args.targets or 'all'})")
        documents = {}
        for run in runs:
            try:
                documents[run["name"]] = json.loads((run["path"] / RESULTS_FILE).read_text())
            except (OSError, ValueError) as exc:
                raise SoupError(f"{run['path'] / RESULTS_FILE}: cannot read it ({exc})") from None
        rule = args.selection or default_rule(documents)
        kinds = KINDS if args.kind == "both" else (args.kind,)
        out = args.out or args.sweep_out / SOUPS_DIR
        planned = []
        for (method, target, seed), members in groups(runs, args.across_seeds).items():
            init = check_same_start(members, documents)
            planned.append((method, target, seed, members, init))
        accelerator, made_by = None, None
        for method, target, seed, members, init in planned:
            found = ingredients(members, documents, rule)
            targets = "+".join(documents[found[0].name]["targets"])
            evaluator = None
            for kind in kinds:
                name = f"{kind}" + (f"-s{seed}" if seed is not None else "")
                folder = out / method / targets / name
                config = soup_config(found[0], folder, f"{method}-{targets}-{name}")
                accelerator = accelerator or build.make_accelerator(config, run_dir=None)
                evaluator = evaluator or SoupEvaluator(config, accelerator)
                if made_by is None:  # this command's layout; evaluation's sums do not depend on it
                    made_by = provenance.provenance_record(provenance.gather_rank_facts(accelerator), [],
                                                           "torch's default (python -m rsc_dist.soup)",
                                                           provenance.now())
                evaluation, record, network = make_soup(kind, found, evaluator, rule)
                soup_seed = seed if seed is not None else min(m["seed"] for m in members)
                write_soup(folder, soup_document(kind, found, evaluation, record, soup_seed, rule, init, config, made_by),
                           network, config, accelerator)
                if accelerator.is_main_process:
                    accuracy = selection.target_mean(evaluation)
                    print(f"{folder}: {kind} soup of {record['kept']} of {record['candidates']} {method} runs; "
                          f"{rule} {100 * selection.score(rule, evaluation):.2f}, target accuracy "
                          f"{'-' if accuracy is None else f'{100 * accuracy:.2f}'}")
    except (UsageError, FileNotFoundError) as exc:
        print(f"rsc_dist.soup: error: {error_line(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_CONFIG
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
