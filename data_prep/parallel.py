"""One way to fan work out over processes, used by convert and verify."""
from __future__ import annotations

import multiprocessing
from contextlib import contextmanager
from functools import partial


@contextmanager
def unordered_map(workers: int, num_items: int):
    """Yield a map-like callable: plain map() in this process for one worker (simple to debug and
    cheap for tiny inputs), else a process pool's imap_unordered. Results must name their item."""
    if workers <= 1 or num_items <= 1:
        yield map
        return
    with multiprocessing.get_context().Pool(min(workers, num_items)) as pool:
        yield partial(pool.imap_unordered, chunksize=1)
