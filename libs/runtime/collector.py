"""Python's cycle collector kept out of batch work whose objects form no cycles."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def cyclic_gc_paused() -> Iterator[None]:
    """Keep Python's cycle collector out of one batch; reference counting still frees.

    A batch of records (a warehouse query's rows and their events, a table gate's consumed
    messages) holds thousands of container objects the collector tracks until the batch is
    written, none of them in a reference cycle: the collector ran over them several times per
    batch (and over the whole heap in its full collections) and never found anything, a sixth
    of a backfill's CPU per row and a quarter of a table gate's Python thread. The batch's
    objects are freed by reference counting when it is done, before the collector runs
    again; garbage cycles other threads make meanwhile wait at most one batch. A collector
    someone else turned off stays off.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
