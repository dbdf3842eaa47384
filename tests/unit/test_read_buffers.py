"""The daemon's read buffers stay on the heap (`memory.keep_reads_on_the_heap`): a pipe read
of 256 KiB that returns a few bytes costs no mmap, mremap and munmap (issue 11: found by the
dispatch benchmark, ~40 µs of daemon CPU per request at concurrency 1)."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys

import pytest

READS = 300
# A child that reads small writes from a pipe with the daemon's own reader, READS times.
CHILD = """
import os, sys
from engctl.daemon import memory, process
if sys.argv[1] == "heap":
    assert memory.keep_reads_on_the_heap()
r, w = os.pipe()
for _ in range(int(sys.argv[2])):
    os.write(w, b'{"jsonrpc":"2.0","id":1,"result":1}\\n')
    assert process.read_available(r)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to count syscalls")
def test_small_reads_cost_no_mmap_per_read() -> None:
    """With the heap threshold set, 300 small reads into 256 KiB buffers make (almost) no
    mremap or munmap: the buffer comes from the heap and goes back to it."""
    out = subprocess.run(
        [
            "strace",
            "-f",
            "-c",
            "-e",
            "trace=mmap,mremap,munmap",
            sys.executable,
            "-c",
            CHILD,
            "heap",
            str(READS),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    counts = {
        parts[-1]: int(parts[3])
        for line in out.stderr.splitlines()
        if len(parts := line.split()) >= 5 and parts[-1] in ("mremap", "munmap")
    }
    assert counts.get("mremap", 0) < READS / 10, out.stderr
    assert counts.get("munmap", 0) < READS / 10, out.stderr


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace to count syscalls")
def test_small_reads_do_not_grow_and_shrink_the_heap_per_read() -> None:
    """Issue 13 (regression): setting the mmap threshold froze glibc's trim threshold at 128
    KiB, under one read buffer: every read grew the heap by brk and its free gave it back by
    brk (with a page fault per 4 KiB written in between), 10-15 % of the daemon's CPU per
    request at concurrency 1. The heap now keeps its free top: (almost) no brk per read."""

    def brks(reads: int) -> int:
        argv = [sys.executable, "-c", CHILD, "heap", str(reads)]
        out = subprocess.run(
            ["strace", "-f", "-c", "-e", "trace=brk", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        for line in out.stderr.splitlines():
            if len(parts := line.split()) >= 5 and parts[-1] == "brk":
                return int(parts[3])
        return 0

    # Against the same child making no read: the imports' own brk calls are not the reads'.
    assert brks(READS) - brks(0) < READS / 10


def test_release_free_memory_frees_what_departed_instances_left_in_cycles() -> None:
    """Issue 13 (RSS after a fleet shrank): the objects of departed instances refer to each
    other, so only the cyclic collector frees them, and its full pass may not come for a
    long while, pinning arenas and heap pages. Giving memory back runs it first."""
    import gc
    import weakref

    from engctl.daemon import memory

    class Node:
        pass

    gc.disable()  # as if no full pass came by itself
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        del a, b
        assert gone() is not None
        memory.release_free_memory()
        assert gone() is None
    finally:
        gc.enable()


def test_freeze_heap_takes_what_lives_now_out_of_full_collections() -> None:
    """Issue 12/13 (regression): a full collection walked every object of the daemon's
    modules (11 ms, the loop stalled in the middle of a rolling reload: requests 4-8 ms
    late). What lives when the daemon starts is frozen; what comes after is collected."""
    import gc
    import weakref

    from engctl.daemon import memory

    class Node:
        pass

    try:
        frozen = memory.freeze_heap()
        # What was frozen and has died since leaves the count: never more than frozen.
        assert frozen > 1000 and 0 < gc.get_freeze_count() <= frozen
        a, b = Node(), Node()  # made after: still collected
        a.other, b.other = b, a  # type: ignore[attr-defined]
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()


def test_own_children_are_the_children_a_scan_of_proc_finds() -> None:
    """Issue 12 (regression): looking for an instance's adopted orphans scanned every process
    of the machine in Python on a thread after each stop, holding the GIL long enough to stall
    the loop in the middle of a rolling reload. The daemon's own children come from its
    threads' `children` files: the same pids a scan finds with this process as parent."""
    import os
    import subprocess

    from engctl.daemon import proctree

    kids = [subprocess.Popen(["sleep", "30"]) for _ in range(3)]
    try:
        found = proctree.own_children()
        if found is None:
            pytest.skip("no /proc/PID/task/TID/children on this kernel")
        me = os.getpid()
        assert {k.pid for k in kids} <= set(found)
        for pid in found:  # each one's parent is this process (as a scan would tell)
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue  # exited meanwhile
            assert int(data[data.rfind(b")") + 2 :].split()[1]) == me
    finally:
        for k in kids:
            k.kill()
            k.wait()
