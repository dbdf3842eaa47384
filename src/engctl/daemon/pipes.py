"""Pipe capacities, read and resized (`pipe_size`, `resize_pipe`); how far the daemon grows its
workers' protocol pipes for large frames, and how much in all (`PipeBudget`).

A frame larger than its pipe crosses it in pieces: the writer fills the pipe, waits for the
reader to empty it, and fills it again, a wake-up of each side per piece (a 115 KB request and
its answer took four such waits with the default 64 KiB pipes). A channel that meets such a frame
asks for a pipe that holds it whole, up to fs.pipe-max-size. Linux counts pipe pages per user
and past fs.pipe-user-pages-soft gives every new pipe of that user 8 KiB (the daemon's next
workers', and any other program's), so what the daemon adds stays within a quarter of it.

The budget is plain values: the channel asks it, then resizes. Imports the stdlib only.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

# A pipe's capacity when nobody asked for another (Linux: 16 pages).
DEFAULT_PIPE_BYTES = 64 * 1024
# What the daemon may add in all where the user's pages are not limited (fs.pipe-user-pages-soft
# = 0) or cannot be read.
UNLIMITED_BUDGET_BYTES = 64 * 1024 * 1024
# fs.pipe-user-pages-soft counts pages of this size (4 KiB on x86-64, up to 64 KiB elsewhere).
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


def pipe_size(fd: int) -> int | None:
    """How many bytes pipe `fd` holds (None where that cannot be read: not Linux, closed)."""
    try:
        size: int = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
    except (OSError, AttributeError, ValueError):  # ValueError: no fd (-1)
        return None
    return size


def resize_pipe(fd: int, size: int) -> int | None:
    """Ask for pipe `fd` to hold `size` bytes (the kernel rounds up to a power of two pages): what
    it holds then, or None where the kernel refused (EPERM: over the user's pipe allowance or
    fs.pipe-max-size; EBUSY: it holds more than that now)."""
    try:
        held: int = fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except (OSError, AttributeError, ValueError):
        return None
    return held


class PipeBudget:
    """The bytes of pipe the daemon may still add, and the largest pipe it may ask for."""

    def __init__(self, total: int, largest: int) -> None:
        self.total = total
        self.largest = largest
        self.used = 0

    @classmethod
    def of_this_user(cls) -> PipeBudget:
        """A quarter of the user's pipe allowance, pipes up to fs.pipe-max-size (1 MiB)."""
        soft = _read_int("/proc/sys/fs/pipe-user-pages-soft")
        largest = _read_int("/proc/sys/fs/pipe-max-size") or 1024 * 1024
        total = soft * PAGE_BYTES // 4 if soft else UNLIMITED_BUDGET_BYTES
        return cls(total, largest)

    def size_for(self, current: int, frame: int) -> int | None:
        """The capacity to ask for so that a frame of `frame` bytes crosses a pipe of `current`
        bytes whole (or in as few pieces as the largest pipe allows); None when it fits
        already, the pipe is as large as it may be, or the budget is spent."""
        if frame <= current:
            return None
        wanted = min(1 << (frame - 1).bit_length(), self.largest)  # the kernel's sizes
        if wanted <= current or self.used + wanted - current > self.total:
            return None
        return wanted

    def took(self, before: int, after: int) -> None:
        """A pipe grew from `before` to `after` bytes."""
        self.used += max(after - before, 0)

    def refused(self) -> None:
        """The kernel refused to grow a pipe (the user is over its allowance): no more asking."""
        self.total = self.used

    def gave_back(self, grown: int) -> None:
        """A grown pipe was closed: what it took is free again."""
        self.used = max(self.used - grown, 0)


def _read_int(path: str) -> int:
    with contextlib.suppress(OSError, ValueError), open(path, "rb") as f:
        return int(f.read())
    return 0
