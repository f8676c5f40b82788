"""Run a function on N gloo ranks in spawned processes, with a timeout and visible errors."""

import datetime
import multiprocessing as mp
import os
import tempfile
import traceback
from pathlib import Path

import torch.distributed as dist


def _entry(fn, rank, world_size, init_file, error_dir, args, port):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if port is None:
            dist.init_process_group(
                "gloo",
                init_method=f"file://{init_file}",
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=60),
            )
        else:  # leave the process group to the code under test (e.g. Accelerate)
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                              LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                              LOCAL_WORLD_SIZE=str(world_size))
        fn(rank, world_size, *args)
        if dist.is_initialized():
            # Both ranks done before either tears gloo down: a rank that destroys its group
            # while its peer still has the connection open was seen to abort at exit (SIGABRT,
            # "terminate called without an active exception") on a loaded machine.
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        Path(error_dir, f"rank{rank}.txt").write_text(traceback.format_exc())
        raise


def run_on_ranks(fn, world_size, *args, timeout=180, env_init=False):
    """Call ``fn(rank, world_size, *args)`` on each rank; raise with the rank's traceback.

    ``env_init``: set the torchrun environment variables instead of initializing the group.
    """
    ctx = mp.get_context("spawn")
    port = free_port() if env_init else None
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_entry, args=(fn, r, world_size, init_file, tmp, args, port))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = {f.name: f.read_text() for f in sorted(Path(tmp).glob("rank*.txt"))}
        if errors:
            raise AssertionError("worker failed:\n" + "\n".join(f"{k}:\n{v}" for k, v in errors.items()))
        if hung:
            raise AssertionError(f"ranks {hung} did not finish within {timeout}s")
        bad = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode != 0]
        if bad:
            raise AssertionError(f"workers exited with codes {bad}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
