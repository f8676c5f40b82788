"""Train a DG method (rsc_dist.methods: RSC, ERM, CORAL, ...) with leave-domain-out evaluation, on 1 CPU, N gloo ranks or N GPUs.

    accelerate launch rsc_dist/train.py                        # the built-in demo (CPU ok)
    accelerate launch --num_processes 2 rsc_dist/train.py      # 2 ranks (gloo on CPU)
    accelerate launch --config_file accelerate_config.yaml rsc_dist/train.py \\
        --config pacs_resnet50 --data.root /data/pacs_shards --data.target sketch
    ... --algorithm erm --rsc.p_batch 0.25 --run.seed 1 --resume auto
    python -m rsc_dist.train --help                            # every config field

This module parses the command line; the run itself (plan the data, assemble model, optimizer
and method, resume if a checkpoint exists, train, write results.json, print the accuracy
table) is rsc_dist.trainer.run. Exit codes and files other programs rely on:
rsc_dist/core/contracts.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch rsc_dist/train.py` runs this as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # before the imports below, which a process that only starts ranks never needs
    from rsc_dist.trainer.cpu_launch import exit_if_this_process_starts_the_ranks

    exit_if_this_process_starts_the_ranks(str(Path(__file__).resolve()), "rsc_dist.train")


from rsc_dist import methods
from rsc_dist.config import Config, describe_fields, load_config, to_dict
from rsc_dist.core.contracts import EXIT_CONFIG, EXIT_OK
from rsc_dist.core.errors import UsageError
from rsc_dist.data.streams import error_line
from rsc_dist.trainer import cpu_launch
from rsc_dist.trainer.run import run


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    fields = "\n".join(f"  {flag:<40} {kind}\n      {doc}" for flag, kind, doc in describe_fields())
    listed = "\n".join(f"  {name:<9} {method.summary}" for name, method in methods.METHODS.items())
    parser = argparse.ArgumentParser(
        prog="rsc_dist.train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Train {'/'.join(m.upper() for m in methods.NAMES)} on webdataset shards. Every config field below can be set with "
        "--section.key=value (or --section.key value); lists are comma-separated or [a,b].",
        epilog=f"methods (--algorithm; docs/method.md says what each computes and how it is exact across "
               f"ranks):\n{listed}\n\nconfig fields (type = default):\n{fields}\n\n"
               "Exit codes: 0 done, 2 config/data error, 3 non-finite loss, 75 stopped (rerun to resume).",
    )
    parser.add_argument("--config", default="demo", help="preset name or YAML path (default: demo)")
    parser.add_argument("--output_dir", help="run folder (default: runs/EXPERIMENT/ALGO/TARGET/seedS-FINGERPRINT)")
    parser.add_argument("--resume", default="auto",
                        help="auto (newest checkpoint in the run folder, if any), none, a checkpoint path, "
                        "or force (auto, continuing even where the checkpoint's settings differ)")
    parser.add_argument("--algorithm", choices=methods.NAMES)
    parser.add_argument("--print_config", action="store_true", help="print the resolved config and exit")
    return parser.parse_known_args(argv)


def resolve_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    args, overrides = parse_args(argv)
    if args.algorithm:
        overrides = [f"--algorithm={args.algorithm}"] + overrides
    if args.output_dir:
        overrides = [f"--run.output_dir={args.output_dir}"] + overrides
    return load_config(args.config, overrides), args


def main(argv: list[str] | None = None) -> int:
    started = cpu_launch.start_ranks_if_needed(str(Path(__file__).resolve()), argv, "rsc_dist.train")
    if started is not None:
        return started
    try:
        config, args = resolve_config(argv)
        if args.print_config:
            print(json.dumps(to_dict(config), indent=2))
            return EXIT_OK
        return run(config, args.resume)
    except (UsageError, FileNotFoundError) as exc:
        _close_progress_bars()
        print(f"rsc_dist.train: error: {error_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_CONFIG


def _close_progress_bars() -> None:
    """End an open progress bar's line, so the error starts its own (and is the last: an open bar
    would be drawn again when the interpreter exits)."""
    from tqdm import tqdm

    for bar in list(tqdm._instances):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
