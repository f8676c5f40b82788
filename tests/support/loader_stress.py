"""Many loader starts while other threads keep entering Python: the hazard of forking a
threaded training process (CPython gh-112275), measured on this machine's interpreter.

    python tests/support/loader_stress.py PATH STARTS [--workers N] [--churn K] [--timeout S]

PATH is ``fork`` (the loader as it was: workers forked from this process) or ``server`` (the
trainer's loader, rsc_dist.data.streams.make_loader: workers forked from the fork server). K
threads start native threads in a loop, each of which enters Python once through the GIL API
(a ctypes callback: PyGILState_Ensure creates a thread state under CPython's runtime lock,
HEAD_LOCK, before it takes the GIL) — what a C++ library thread calling into Python does. A
worker forked while one of them holds HEAD_LOCK blocks forever in PyOS_AfterFork_Child; the
loader's timeout turns that into an error, counted as a hung start. Prints one JSON line:
{"path", "starts", "hung", "seconds", "entries_per_s", "worker_parents"}.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset  # noqa: E402

from rsc_dist.data import streams  # noqa: E402


class Numbers(IterableDataset):
    """Two tiny batches; the worker reports its parent's pid with them."""

    def __iter__(self):
        for i in range(2):
            yield {"value": torch.tensor([i]), "parent": os.getppid()}


def old_loader(dataset, workers: int) -> DataLoader:
    """The loader as rsc_dist built it before the fork server: workers forked from this process."""
    return DataLoader(dataset, batch_size=None, num_workers=workers, worker_init_fn=streams._worker_init,
                      generator=torch.Generator().manual_seed(0), prefetch_factor=4, persistent_workers=False)


_ENTRY = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)


class Churn:
    """Threads that start native threads which each enter Python once, in a loop."""

    def __init__(self, threads: int):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.entered = 0
        self.callback = _ENTRY(self._enter)  # kept alive: native threads call it
        self.running = True
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def _enter(self, _argument):
        self.entered += 1
        return None

    def _loop(self):
        native = ctypes.c_ulong()
        while self.running:
            if self.libc.pthread_create(ctypes.byref(native), None, self.callback, None) == 0:
                self.libc.pthread_join(native, None)

    def stop(self):
        self.running = False
        for thread in self.threads:
            thread.join()


def run(path: str, starts: int, workers: int, churn_threads: int, timeout: float) -> dict:
    make = old_loader if path == "fork" else (lambda d, w: streams.make_loader(d, w, pin_memory=False))
    if path == "server":
        streams.start_worker_server()  # as the trainer does during setup, before the threads
    churn = Churn(churn_threads)
    hung, parents = 0, set()
    begin = time.monotonic()
    for _ in range(starts):
        loader = make(Numbers(), workers)
        loader.timeout = timeout  # a worker that never starts becomes an error after this long
        try:
            parents.update(batch["parent"] for batch in loader)
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                raise
            hung += 1
        del loader
        for child in streams.multiprocessing.active_children():  # a hung worker ignores SIGTERM
            if child.daemon and child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
                child.join()
    seconds = time.monotonic() - begin
    churn.stop()
    server = [pid for pid in parents if pid != os.getpid()]
    return {"path": path, "starts": starts, "workers": workers, "hung": hung, "seconds": round(seconds, 1),
            "entries_per_s": round(churn.entered / seconds), "worker_parents": "this process" if not server
            else "another process"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("path", choices=("fork", "server"))
    parser.add_argument("starts", type=int)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--churn", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--switch", type=float, default=None)
    args = parser.parse_args(argv)
    if args.switch:
        sys.setswitchinterval(args.switch)
    print(json.dumps(run(args.path, args.starts, args.workers, args.churn, args.timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
