"""glibc malloc settings for the enricher's process, set once the tables' cold load is done.

Every alert's message is built from strings of 2 to 4 KB (the blocks' UTF-8 decode, the output's
join, librdkafka's copy): above CPython's small-object allocator, so glibc ``malloc`` serves
them from the heap's top. With glibc's defaults the top is trimmed back (``brk``) whenever
more than 128 KB is free there, and grown again by the next batch: a system call pair and
fresh zeroed pages per batch, seen as ``brk``/``sbrk`` under ``malloc`` and ``free`` in the
loop's native profile. Here the heap keeps up to ``TRIM_THRESHOLD`` free at its top and grows
by ``TOP_PAD`` at a time; large blocks (``MMAP_THRESHOLD``: a table's restore batch, a
producer buffer) keep their own mappings, returned when freed. Set after the gate's
``malloc_trim`` (``app.release_freed_heap``), so the cold load runs with glibc's defaults and
its peak is what it was; afterwards only memory the batches touch stays resident (the 1M-key
RSS budget: tests/perf/ENRICHER.md, "Checkpoint, lookups and malloc").

``ENRICHER_MALLOC_TUNE=false`` leaves glibc's defaults (or the operator's ``GLIBC_TUNABLES``).
Other C libraries (musl has no ``mallopt``) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Final

#: mallopt parameters (glibc <malloc.h>)
M_TRIM_THRESHOLD: Final = -1
M_TOP_PAD: Final = -2
M_MMAP_THRESHOLD: Final = -3

TRIM_THRESHOLD: Final = 64 * 1024 * 1024
TOP_PAD: Final = 16 * 1024 * 1024
MMAP_THRESHOLD: Final = 4 * 1024 * 1024


def tune_malloc(libc: object | None = None) -> str:
    """Set the heap's mmap threshold, trim threshold and top pad; say what was done.

    ``libc`` (a loaded C library) is for tests; by default the process's.
    """
    if libc is None:
        name = ctypes.util.find_library("c")
        if name is None:
            return "malloc: no C library found, defaults kept"
        libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return "malloc: no mallopt (not glibc), defaults kept"
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
    )
    for param, value in settings:
        if mallopt(ctypes.c_int(param), ctypes.c_int(value)) != 1:
            return f"malloc: mallopt({param}, {value}) refused; the settings before it hold"
    return (
        f"malloc: trim threshold {TRIM_THRESHOLD >> 20} MB, top pad {TOP_PAD >> 20} MB, "
        f"mmap threshold {MMAP_THRESHOLD >> 20} MB"
    )
