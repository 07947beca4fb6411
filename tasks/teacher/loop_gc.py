"""The cyclic garbage collector while a request loop runs (a client process, the build's
teacher stage)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


# Young-object collections while a request loop runs (a client process, the build's teacher
# stage): every this many allocations, not Python's default 700. A request allocates a few
# hundred container objects that reference counting frees within its turn, so collecting
# them a few times per request is wasted work.
YOUNG_COLLECTION_ALLOCATIONS = 10_000


@contextlib.contextmanager
def request_loop_gc() -> Iterator[None]:
    """The cyclic garbage collector while a request loop runs (a client process's life, the
    build's teacher stage), restored afterwards: the objects alive now are frozen out of it,
    since it would walk them on every full collection the requests' garbage triggers, and
    young objects are collected every `YOUNG_COLLECTION_ALLOCATIONS` allocations. Measured
    on 20,000 requests: the collector's time falls from ~2.3 s to ~0.1 s."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(thresholds[0], YOUNG_COLLECTION_ALLOCATIONS), *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
