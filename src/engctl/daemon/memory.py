"""The daemon's own memory: where glibc serves its reads from, how many arenas its threads
share, giving freed pages back after instances leave, and keeping its long-lived objects out
of the cyclic collector's full passes. Mechanism only (`main` decides when); imports no other
daemon module.
"""

from __future__ import annotations

import asyncio
import os


def own_rss() -> int:
    """This process's resident memory in bytes (/proc/self/statm, what psutil reads)."""
    try:
        with open("/proc/self/statm", "rb", buffering=0) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# glibc's mallopt parameters, the size up to which allocations stay on the heap, and the free
# space at the heap's top that glibc keeps instead of giving it back at once.
M_MMAP_THRESHOLD = -3
M_TRIM_THRESHOLD = -1
HEAP_READS_BYTES = 1 << 20
HEAP_TOP_KEPT_BYTES = 2 << 20


def keep_reads_on_the_heap() -> bool:
    """Serve the daemon's read buffers from the heap (glibc): every pipe and socket read asks
    for 256 KiB, above glibc's initial mmap threshold of 128 KiB, and a read that returns a
    few bytes is then shrunk and freed: mmap, mremap and munmap on every request. glibc raises
    the threshold by itself only after some larger block happens to be freed, so whether a
    daemon paid them depended on its start-up; this makes it never pay them. Setting it also
    freezes the trim threshold at 128 KiB, under one read buffer: each read grew the heap
    (brk, then a page fault per 4 KiB written) and the free gave it back (brk): 10-15 % of
    the daemon's CPU per request one at a time. So the heap keeps up to 2 MiB free at its
    top (`release_free_memory` still trims it when instances leave). False where there is
    no glibc `mallopt` (the reads work the same, at that cost)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    heap = mallopt(M_MMAP_THRESHOLD, HEAP_READS_BYTES) == 1
    return bool(heap and mallopt(M_TRIM_THRESHOLD, HEAP_TOP_KEPT_BYTES) == 1)


# glibc's mallopt parameter for the number of malloc arenas.
M_ARENA_MAX = -8


def share_one_malloc_arena() -> bool:
    """Let every thread allocate from the main heap (glibc): each of the daemon's threads
    (monitor, writers, the pool that sweeps exited trees) would otherwise get an arena of
    its own, whose touched pages stay mapped. Its threads allocate little and seldom at the
    same time, so sharing costs no waiting. False where there is no glibc `mallopt`."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, 1) == 1)


# Seconds after instances leave before their memory is given back: by then what still
# referred to them (the call that removed them, their last callbacks) has let go.
RELEASE_DELAY = 5.0
_release: asyncio.TimerHandle | None = None


def release_free_memory() -> bool:
    """Give the heap's free pages back to the system (glibc `malloc_trim`): after a fleet
    shrinks, what its instances used stays mapped otherwise, as glibc returns only the top of
    the heap. False where there is no glibc."""
    global _release
    _release = None
    import ctypes
    import gc

    # The departed instances' objects refer to each other (instance, engine, process,
    # callbacks): only the cyclic collector frees them, and its full pass may not come for
    # a long while. Until then they pin CPython's arenas and the heap's pages (~4 MiB after
    # a fleet of 200). A full pass takes some ms, once, after a fleet shrank.
    gc.collect()
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    return bool(trim(0))


def freeze_heap() -> int:
    """Move every object alive now out of the cyclic collector's sight (`gc.freeze`): the
    daemon's modules live as long as it does, and each full collection walked them all (11 ms
    with 4 instances, the loop stalled: requests 4-8 ms late in the middle of a rolling
    reload). Only for objects that are never cyclic garbage: frozen, a cycle is never freed.
    Returns how many objects are frozen."""
    import gc

    gc.collect()  # what is garbage already is not kept for ever
    gc.freeze()
    return gc.get_freeze_count()


def release_free_memory_soon(loop: asyncio.AbstractEventLoop) -> None:
    """`release_free_memory` once, RELEASE_DELAY seconds from now, however often called."""
    global _release
    if _release is None:
        _release = loop.call_later(RELEASE_DELAY, release_free_memory)
