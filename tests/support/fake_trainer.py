"""A stand-in for rsc_dist/train.py that honours the trainer's launch contract, and nothing else.

The SLURM tests run the real launch scripts with this script as the trainer
(`RSC_TRAIN_SCRIPT=tests/support/fake_trainer.py`), so the scripts' behaviour (ranks, rendezvous,
signals, requeue, resume, output folders, W&B variables) is tested in seconds and without data.
The contract it honours, the same the real trainer must:

    accelerate launch ... fake_trainer.py --config NAME --output_dir DIR --resume auto [--a.b=v ...]

- ranks run in lock step (one gloo all-reduce per step, like a DDP gradient sync); the state
  after each step is a deterministic "weight" that depends on every earlier step;
- SIGUSR1 or SIGTERM only sets a flag; the ranks agree on it at the next step boundary
  (one all-reduce), rank 0 saves a checkpoint and writes DIR/preempted.json, no rank exits
  before the checkpoint is complete, all exit with 75 (EX_TEMPFAIL); a start clears the marker;
- `--resume auto` continues from the newest DIR/checkpoints/checkpoint_XXXXXXXX (none: fresh);
- at the end DIR/results.json in the documented layout, exit 0.

Knobs (dotted overrides, like the real trainer's): --fake.steps (30), --fake.step_time (0.2 s),
--fake.ckpt_every (10), --fake.fail_at_step (-1: never; else exit 1 there, a crash),
--fake.stop_at_step (-1: never; else stop there as if signalled, like train.stop_at_step).
Rank 0 appends what happened to DIR/fake_events.jsonl (start / checkpoint / stop / finish) so
tests can see where a run resumed and what it was started with; a stop records how many ranks
had the flag at the boundary (ranks_flagged) and how many got the signal at all (ranks_signalled).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

EX_TEMPFAIL = 75


def parse(argv: list[str]) -> tuple[dict, dict]:
    """Split `--key value` / `--key=value` pairs into (top-level flags, dotted overrides)."""
    flags, overrides = {}, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            sys.exit(f"fake_trainer: unexpected argument {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                sys.exit(f"fake_trainer: --{key} needs a value")
            value, i = argv[i + 1], i + 1
        (overrides if "." in key or key == "algorithm" else flags)[key] = value
        i += 1
    for required in ("config", "output_dir"):
        if required not in flags:
            sys.exit(f"fake_trainer: --{required} is required")
    return flags, overrides


def newest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("checkpoint_*[0-9]"))
    ckpts = [c for c in ckpts if (c / "state.json").exists()]
    return ckpts[-1] if ckpts else None


def save_checkpoint(out: Path, step: int, weight: float) -> Path:
    """Written under a temporary name and renamed: a half-written checkpoint is never found."""
    final = out / "checkpoints" / f"checkpoint_{step:08d}"
    if final.exists():  # this step is saved already (periodic save, then a stop request)
        return final
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "state.json").write_text(json.dumps({"step": step, "weight": weight}))
    tmp.rename(final)
    return final


def unit(*parts) -> float:
    """A deterministic number in [0, 1) from its arguments."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def main() -> int:
    flags, over = parse(sys.argv[1:])
    out = Path(flags["output_dir"])
    steps = int(over.get("fake.steps", 30))
    step_time = float(over.get("fake.step_time", 0.2))
    ckpt_every = int(over.get("fake.ckpt_every", 10))
    fail_at = int(over.get("fake.fail_at_step", -1))
    stop_at = int(over.get("fake.stop_at_step", -1))
    algorithm = over.get("algorithm", "rsc")
    target = over.get("data.target", "sketch")
    seed = int(over.get("run.seed", 0))

    stop = {"signal": None}

    def on_signal(signum, _frame):  # only a flag: the ranks act on it together
        stop["signal"] = signal.Signals(signum).name

    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    dist = None
    if world > 1:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")

    def all_reduce(values: list[float], op: str) -> list[float]:
        if dist is None:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def event(**kw) -> None:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "fake_events.jsonl", "a") as f:
                f.write(json.dumps({**kw, "time": time.time()}) + "\n")

    step, weight = 0, float(seed)
    ckpt = newest_checkpoint(out) if flags.get("resume") == "auto" else None
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        step, weight = state["step"], state["weight"]
    if rank == 0:
        (out / "preempted.json").unlink(missing_ok=True)
    event(event="start", step=step, world_size=world, argv=sys.argv[1:], pid=os.getpid(),
          restart_count=os.environ.get("SLURM_RESTART_COUNT"), job_id=os.environ.get("SLURM_JOB_ID"))

    start = time.monotonic()
    while step < steps:
        # The step boundary: the ranks agree on stop requests (how many ranks saw one).
        (n_flagged,) = all_reduce([1.0 if stop["signal"] else 0.0], "SUM")
        if n_flagged:
            if rank == 0:
                save_checkpoint(out, step, weight)
                (out / "preempted.json").write_text(json.dumps({"step": step, "reason": stop["signal"]}))
            # A signal forwarded rank by rank (node_launch.sh's pkill) can reach one rank after the
            # others agreed to stop at this boundary; the stop is right either way. So that tests
            # can still tell whether the signal reached every rank, a rank without the flag waits
            # a little for it, and the ranks count again.
            deadline = time.monotonic() + 10
            while 0 < n_flagged < world and not stop["signal"] and time.monotonic() < deadline:
                time.sleep(0.01)
            (n_signalled,) = all_reduce([1.0 if stop["signal"] else 0.0], "SUM")
            event(event="stop", step=step, signal=stop["signal"], ranks_flagged=n_flagged,
                  ranks_signalled=n_signalled)
            if dist is not None:
                dist.barrier()  # nobody leaves before the checkpoint is complete
                dist.destroy_process_group()
            return EX_TEMPFAIL
        if step == fail_at:
            print(f"fake_trainer: rank {rank} failing at step {step} as asked", file=sys.stderr)
            return 1
        time.sleep(step_time)
        # "Gradient sync": every rank contributes, the update depends on the whole history.
        (grad,) = all_reduce([unit(seed, step, rank)], "SUM")
        weight = weight * 0.9 + grad
        step += 1
        if step == stop_at:  # reached in this start (a resume at stop_at does not stop again)
            stop["signal"] = f"fake.stop_at_step={step}"
        if ckpt_every > 0 and step % ckpt_every == 0 and step < steps:
            if rank == 0:
                save_checkpoint(out, step, weight)
                event(event="checkpoint", step=step)
            if dist is not None:
                dist.barrier()

    if rank == 0:
        base = 0.5 + 0.1 * (algorithm == "rsc") + 0.05 * unit(target)
        acc = lambda *k: round(base + 0.02 * unit(seed, target, *k), 6)  # noqa: E731
        results = {
            "config": {"preset": flags["config"], "algorithm": algorithm,
                       "run": {"seed": seed}, "data": {"target": [target]},
                       "model": {"arch": "resnet18"}},
            "fake_overrides": over,  # beside the config: tables split rows on the config's settings
            "algorithm": algorithm, "dataset": "fake", "arch": "resnet18",
            "targets": [target], "seed": seed,
            "best": {"step": steps // 2, "val_acc": acc("bv"), "target_acc": {target: acc("bt")}},
            "last": {"step": steps, "val_acc": acc("lv"), "target_acc": {target: acc("lt")}},
            "throughput_img_s": 1000.0,
            "fake": {"weight": weight, "world_size": world,
                     "seconds_this_start": time.monotonic() - start},
        }
        (out / "results.json").write_text(json.dumps(results, indent=2))
    event(event="finish", step=step, weight=weight)
    if dist is not None:
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
