"""Command line: convert, verify, synth, index.

    python -m data_prep convert --format {pacs,vlcs,office_home,domainnet,imagefolder,imagenet,imagenet_sketch} \\
        --src DIR --out DIR [--shard-samples N] [--shard-bytes B] [--workers W] [--strict] \\
        [--val-fraction F] [--seed S] [--classes-from OTHER_SHARD_ROOT] [--max-pixels N] [--no-progress]
    python -m data_prep verify DIR [--decode] [--workers W] [--max-pixels N]
    python -m data_prep synth --out DIR [--image-size 64] [--images-per-class 60] [--seed 0]
    python -m data_prep index DIR        # add per-sample byte offsets to a version-1 manifest

Exit status: 0 on success; 1 when convert meets an input error (or a --strict problem) or verify
finds a fault; 2 for usage errors.
"""
from __future__ import annotations

import argparse
import sys

from data_prep.convert import DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, convert, default_workers
from data_prep.formats import FORMATS
from data_prep.images import MAX_PIXELS
from data_prep.manifest import REPORT_NAME, ManifestError
from data_prep.records import ConvertError

NO_VAL_LINES = 10  # console lines for (domain, class) pairs without val; the report has all


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    c = commands.add_parser("convert", help="source image layout -> webdataset shards + _info.json")
    c.add_argument("--format", required=True, choices=sorted(FORMATS))
    c.add_argument("--src", required=True, help="dataset folder in its published layout (see data_prep/README.md)")
    c.add_argument("--out", required=True, help="output folder (empty, or an earlier output to update)")
    c.add_argument("--shard-samples", type=int, default=DEFAULT_SHARD_SAMPLES, help="max samples per shard")
    c.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES, help="max bytes per shard (approximate)")
    c.add_argument("--workers", type=int, default=default_workers(), help="processes writing shards")
    c.add_argument("--strict", action="store_true", help="any skipped input or warning is an error")
    c.add_argument("--val-fraction", type=float, default=None,
                   help="ask for a seeded random holdout of this share of each (domain, class) as val (DomainBed: "
                        "0.2); without it a layout's own splits are used (PACS stops if its split files are "
                        "missing) and layouts without any hold out 0.1")
    c.add_argument("--seed", type=int, default=0, help="seed of the holdout and of the sample order in shards")
    c.add_argument("--classes-from", help="shard root whose class order to reuse (e.g. ImageNet's for a sketch set)")
    c.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="skip images with more pixels (read from the header before decoding)")
    c.add_argument("--no-progress", action="store_true")

    v = commands.add_parser("verify", help="check shards against the manifest")
    v.add_argument("root")
    v.add_argument("--decode", action="store_true", help="also decode every image as the trainer does")
    v.add_argument("--workers", type=int, default=1)
    v.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="with --decode: refuse images with more pixels without decoding them")
    v.add_argument("--no-progress", action="store_true")

    i = commands.add_parser("index", help="upgrade a version-1 manifest in place: add per-sample byte offsets")
    i.add_argument("root")
    i.add_argument("--no-progress", action="store_true")

    s = commands.add_parser("synth", help="write the PACS-like demo dataset (JPEG + kfold split files)")
    s.add_argument("--out", required=True)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--images-per-class", type=int, default=60, help="per class and domain")
    s.add_argument("--seed", type=int, default=0)
    return parser


def _convert(args) -> int:
    summary = convert(args.format, args.src, args.out, shard_samples=args.shard_samples, shard_bytes=args.shard_bytes,
                      workers=args.workers, strict=args.strict, val_fraction=args.val_fraction, seed=args.seed,
                      classes_from=args.classes_from, progress=not args.no_progress, max_pixels=args.max_pixels)
    print(f"wrote {summary.num_samples} samples in {summary.num_shards} shards to {summary.out} "
          f"({summary.reused_shards} shards reused); skipped {summary.skipped}, re-encoded {summary.reencoded}, "
          f"warnings {summary.warnings}; details in {summary.out / REPORT_NAME}")
    print("val: " + ("the layout's own split" if summary.holdout is None
                     else f"a seeded random holdout of {summary.holdout:g} per (domain, class) (--val-fraction)"))
    for line in summary.no_val[:NO_VAL_LINES]:
        print(f"warning: no_val: {line}")
    if len(summary.no_val) > NO_VAL_LINES:
        print(f"warning: no_val: ... {len(summary.no_val) - NO_VAL_LINES} more (domain, class) pairs without val; "
              f"all in {summary.out / REPORT_NAME}")
    return 0


def _verify(args) -> int:
    from data_prep.verify import verify

    faults = verify(args.root, decode=args.decode, workers=args.workers, progress=not args.no_progress,
                    max_pixels=args.max_pixels)
    for fault in faults:
        print(fault)
    print(f"verify {args.root}: {'OK' if not faults else f'FAILED with {len(faults)} faults'}")
    return 1 if faults else 0


def _synth(args) -> int:
    from data_prep.synth import write_demo_dataset

    try:
        root = write_demo_dataset(args.out, image_size=args.image_size, images_per_class=args.images_per_class,
                                  seed=args.seed)
    except ValueError as error:
        raise ConvertError(str(error)) from None
    except OSError as error:
        raise ConvertError(f"--out {args.out}: {error.strerror or error}") from None
    print(f"wrote the demo dataset to {root}; convert it with: "
          f"python -m data_prep convert --format pacs --src {root} --out SHARDS")
    return 0


def _index(args) -> int:
    from data_prep.index import index_manifest

    scanned = index_manifest(args.root, progress=not args.no_progress)
    print(f"index {args.root}: " + (f"added sample offsets of {scanned} shards (format_version 2)"
                                    if scanned is not None else "already format_version 2, nothing to do"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return {"convert": _convert, "verify": _verify, "synth": _synth, "index": _index}[args.command](args)
    except (ConvertError, ManifestError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
