"""Sampling of every live instance, in a thread of its own so the event loop never waits.

Each tick reads CPU %, RSS, threads and fds of each instance's process and its descendants:
/proc/PID/stat and statm (the fields psutil reads in four files) and a count of its fds. The
descendant trees are rediscovered every few ticks from the `children` files of the instances'
processes (or, without them, one pass over /proc). psutil reads the host. Results are handed to
the loop with `call_soon_threadsafe`.

Mechanism: imports no other daemon module (the daemon applies what it reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import psutil

log = logging.getLogger("engctl.monitor")

# Descendants are rediscovered every this many ticks; engines rarely fork after start-up.
DISCOVER_EVERY = 5
# /proc/PID/task/TID/children exists (CONFIG_PROC_CHILDREN, in every common distribution's kernel).
HAS_CHILDREN_FILES = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
# Units of /proc/PID/stat: CPU times in clock ticks, RSS in pages, start time in ticks since boot.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Sample:
    """The latest psutil reading of an instance (process plus descendants)."""

    cpu_percent: float = 0.0
    rss_bytes: int = 0
    threads: int = 0
    fds: int = 0
    descendants: list[tuple[int, float]] = field(default_factory=list)
    pid: int = 0  # the leader it was taken of: a reading of a replaced process is dropped


@dataclass
class HostSample:
    """One reading of the machine: CPU, memory, and disk and network byte counters."""

    cpu_percent: float = 0.0
    mem_used: int = 0
    mem_total: int = 0
    disk_read: int = 0
    disk_write: int = 0
    net_sent: int = 0
    net_recv: int = 0


def ppid_map() -> dict[int, list[int]]:
    """Children of every process, from one pass over /proc (parent pid -> child pids)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        data = _read_proc(f"/proc/{entry.name}/stat")
        if data is None:
            continue
        # The command name is in parentheses and may itself contain spaces or ')'.
        rest = data[data.rfind(b")") + 2 :].split(b" ", 2)
        with contextlib.suppress(ValueError, IndexError):
            children[int(rest[1])].append(int(entry.name))
    return children


def children_of(pid: int) -> list[int]:
    """Children of `pid`, from the `children` file of each of its threads (CONFIG_PROC_CHILDREN):
    a few reads per process, where `ppid_map` reads every process of the machine."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    out: list[int] = []
    for tid in tids:
        data = _read_proc(f"/proc/{pid}/task/{tid}/children")
        if data:
            out += map(int, data.split())
    return out


def tree_of(pids: Iterable[int]) -> dict[int, list[int]]:
    """The descendants of each of `pids`: from the `children` files where the kernel has them
    (the cost grows with the fleet, not with the machine's processes), else from `ppid_map`."""
    if not HAS_CHILDREN_FILES:
        children = ppid_map()
        return {pid: descendants_of(pid, children) for pid in pids}
    out = {}
    for pid in pids:
        found: list[int] = []
        stack = children_of(pid)
        while stack:
            p = stack.pop()
            found.append(p)
            stack.extend(children_of(p))
        out[pid] = found
    return out


def descendants_of(pid: int, children: dict[int, list[int]]) -> list[int]:
    out: list[int] = []
    stack = list(children.get(pid, ()))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, ()))
    return out


@dataclass
class ProcStat:
    """The fields of /proc/PID/stat and statm a sample needs (proc(5))."""

    cpu_ticks: int  # utime + stime
    threads: int
    start_ticks: int  # since boot: with the pid, names the process against pid reuse
    rss_pages: int  # statm's: stat's own is a per-CPU estimate, some 100 KiB off


def _read_proc(path: str) -> bytes | None:
    """A small /proc file, None if it is gone. os.open/os.read: a third of the cost of open()
    and its buffered file, once per process and tick (a fleet of 1,000 is 1,000 a second)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_stat(pid: int) -> ProcStat | None:
    """One read of /proc/PID/stat and one of statm; None when the process is gone."""
    data = _read_proc(f"/proc/{pid}/stat")
    if data is None:
        return None
    # The command name is in parentheses and may itself contain spaces or ')': the fields are
    # counted after the last ')', from field 3 (state) on.
    fields = data[data.rfind(b")") + 2 :].split()
    if fields[:1] == [b"Z"]:
        return None  # a zombie: it has exited, only its exit status is left to reap
    statm = _read_proc(f"/proc/{pid}/statm")
    try:
        return ProcStat(
            int(fields[11]) + int(fields[12]),  # utime, stime (fields 14, 15)
            int(fields[17]),  # num_threads (20)
            int(fields[19]),  # starttime (22)
            int(statm.split()[1]) if statm else 0,  # resident (what psutil reads)
        )
    except (IndexError, ValueError):
        return None


def count_fds(pid: int) -> int:
    """The open fds of `pid`: the size of /proc/PID/fd (Linux 6.2 and later count them there,
    a stat instead of a listing), else the length of its listing."""
    where = f"/proc/{pid}/fd"
    try:
        return os.stat(where).st_size or len(os.listdir(where))
    except OSError:
        return 0


class Monitor:
    """Samples the pids in `targets` every `interval` seconds and reports through `on_samples`."""

    def __init__(
        self,
        interval: float,
        loop: asyncio.AbstractEventLoop,
        on_samples: Callable[[dict[str, Sample], HostSample | None], None],
    ) -> None:
        self.interval = interval
        self.targets: dict[str, int] = {}
        self._loop = loop
        self._on_samples = on_samples
        # (start ticks, CPU ticks, when) of each pid's last reading: its CPU % is the ticks
        # used since then over the time since then (what psutil's cpu_percent computes).
        self._procs: dict[int, tuple[int, int, float]] = {}
        self._tree: dict[int, list[int]] = {}
        self._tick = 0
        self._boot = psutil.boot_time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engctl-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def set_targets(self, targets: dict[str, int]) -> None:
        """Replace the watched pids; a new dict object, so the thread sees it whole or not."""
        self.targets = targets

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                samples = self.sample_once()
                host = sample_host()
            except Exception:  # never let the sampler die: log and try next tick
                log.exception("sampling failed")
                continue
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                self._loop.call_soon_threadsafe(self._on_samples, samples, host)

    def sample_once(self) -> dict[str, Sample]:
        """One reading of every target; vanished processes are skipped, never raised."""
        targets = self.targets
        if self._tick % DISCOVER_EVERY == 0 or set(targets.values()) - set(self._tree):
            self._tree = tree_of(targets.values())
        self._tick += 1
        procs = self._procs
        seen: dict[int, tuple[int, int, float]] = {}
        out: dict[str, Sample] = {}
        for inst_id, pid in targets.items():
            sample = Sample(pid=pid)
            for i, p_id in enumerate([pid, *self._tree.get(pid, ())]):
                stat = read_stat(p_id)
                if stat is None:
                    continue
                now = time.monotonic()
                last = procs.get(p_id)
                if last is not None and last[0] == stat.start_ticks and now > last[2]:
                    used = (stat.cpu_ticks - last[1]) / CLOCK_TICKS
                    sample.cpu_percent += max(used, 0.0) / (now - last[2]) * 100
                seen[p_id] = (stat.start_ticks, stat.cpu_ticks, now)
                sample.rss_bytes += stat.rss_pages * PAGE_SIZE
                sample.threads += stat.threads
                sample.fds += count_fds(p_id)
                if i > 0:
                    created = self._boot + stat.start_ticks / CLOCK_TICKS
                    sample.descendants.append((p_id, created))
            out[inst_id] = sample
        self._procs = seen  # the pids read this tick: the others have exited or left
        return out


def sample_host() -> HostSample | None:
    """CPU %, memory, and disk and network byte counters of the machine."""
    try:
        mem = psutil.virtual_memory()
        disk = psutil.disk_io_counters()
        net = psutil.net_io_counters()
        return HostSample(
            cpu_percent=psutil.cpu_percent(None),
            mem_used=mem.total - mem.available,
            mem_total=mem.total,
            disk_read=disk.read_bytes if disk else 0,
            disk_write=disk.write_bytes if disk else 0,
            net_sent=net.bytes_sent if net else 0,
            net_recv=net.bytes_recv if net else 0,
        )
    except (psutil.Error, OSError):
        return None
