"""One way to fan work out over processes, used by convert and verify.

Pool workers start with a clean signal state whatever the parent installed: SIGTERM and SIGUSR1
back to their defaults, SIGINT to Python's KeyboardInterrupt, none of them blocked. (A trainer
installs SIGTERM/SIGUSR1 handlers before it builds the demo shards; forked workers inherited them,
ignored the pool's SIGTERM on shutdown and outlived their parent.) File descriptors registered
with :func:`close_in_workers` (the demo's lock file) are closed in each forked worker, so that a
worker never keeps the parent's flock alive.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from contextlib import contextmanager
from functools import partial

_RESET_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))
_close_in_workers: set[int] = set()


@contextmanager
def close_in_workers(fd: int):
    """While active, pool workers forked from this process close `fd` first thing."""
    _close_in_workers.add(fd)
    try:
        yield
    finally:
        _close_in_workers.discard(fd)


def _init_worker(inherited_fds: tuple[int, ...]) -> None:
    for signum in _RESET_SIGNALS:
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _RESET_SIGNALS)
    for fd in inherited_fds:
        try:
            os.close(fd)  # drops this process's reference only; the parent keeps its lock
        except OSError:
            pass


@contextmanager
def unordered_map(workers: int, num_items: int):
    """Yield a map-like callable: plain map() in this process for one worker (simple to debug and
    cheap for tiny inputs), else a process pool's imap_unordered. Results must name their item."""
    if workers <= 1 or num_items <= 1:
        yield map
        return
    context = multiprocessing.get_context()
    # only a forked worker holds copies of the parent's descriptors; elsewhere the numbers mean other files
    inherited = tuple(sorted(_close_in_workers)) if context.get_start_method() == "fork" else ()
    with context.Pool(min(workers, num_items), initializer=_init_worker, initargs=(inherited,)) as pool:
        yield partial(pool.imap_unordered, chunksize=1)
