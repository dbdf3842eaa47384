"""Sampling of every live instance, in a thread of its own so the event loop never waits.

Each tick reads CPU %, RSS, threads and fds of each instance's process and its descendants:
/proc/PID/stat and statm (the fields psutil reads in four files) and a count of its fds, all
three kept open between ticks. The
descendant trees are rediscovered every few ticks from the `children` files of the instances'
processes (or, without them, one pass over /proc). The host's figures come from /proc/stat,
meminfo, diskstats and net/dev, read as psutil reads them (psutil itself is not loaded: it
costs the daemon some 0.8 MiB of RSS). Results are handed to the loop with
`call_soon_threadsafe`.

Mechanism: imports no other daemon module but `process` (its /proc readings); the daemon
applies what it reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from .proctree import boot_time

log = logging.getLogger("engctl.monitor")

# Descendants are rediscovered every this many ticks; engines rarely fork after start-up.
DISCOVER_EVERY = 5
# An instance whose readings came out the same this many ticks in a row (CPU ticks, RSS,
# threads, fds of each of its processes: an idle process) is read every QUIET_STRIDE ticks
# until one differs; a reader that wants it fresh asks for a reading (`Monitor.fresh`).
QUIET_AFTER = 3
QUIET_STRIDE = 4
# /proc/PID/task/TID/children exists (CONFIG_PROC_CHILDREN, in every common distribution's kernel).
HAS_CHILDREN_FILES = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")
# The monitor holds the /proc files of processes up to this share of the open-file limit (1/4:
# half is the clients', `connection_cap`; the rest the engines' pipes, 4 fds an instance).
HELD_FILES_SHARE = 4
# Units of /proc/PID/stat: CPU times in clock ticks, RSS in pages, start time in ticks since boot.
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(slots=True)
class Sample:
    """The latest psutil reading of an instance (process plus descendants)."""

    cpu_percent: float = 0.0
    rss_bytes: int = 0
    threads: int = 0
    fds: int = 0
    descendants: list[tuple[int, float]] = field(default_factory=list)
    pid: int = 0  # the leader it was taken of: a reading of a replaced process is dropped
    taken: float = 0.0  # time.monotonic() of the reading (a quiet instance's is kept a while)


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


def children_of(pid: int, threads: int = 0) -> list[int]:
    """Children of `pid`, from the `children` file of each of its threads (CONFIG_PROC_CHILDREN):
    a few reads per process, where `ppid_map` reads every process of the machine. A process
    known to have one thread (`threads` 1) has them all in its main thread's file (the kernel
    hands an exiting thread's children to a live thread of the process): no listing."""
    if threads == 1:
        data = _read_proc(f"/proc/{pid}/task/{pid}/children")
        return list(map(int, data.split())) if data else []
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


def tree_of(pids: Iterable[int], threads: Mapping[int, int] | None = None) -> dict[int, list[int]]:
    """The descendants of each of `pids`: from the `children` files where the kernel has them
    (the cost grows with the fleet, not with the machine's processes), else from `ppid_map`.
    `threads`: the thread counts of the processes last read, where known."""
    if not HAS_CHILDREN_FILES:
        children = ppid_map()
        return {pid: descendants_of(pid, children) for pid in pids}
    counts = threads or {}
    out = {}
    for pid in pids:
        found: list[int] = []
        stack = children_of(pid, counts.get(pid, 0))
        while stack:
            p = stack.pop()
            found.append(p)
            stack.extend(children_of(p, counts.get(p, 0)))
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


class ProcStat(NamedTuple):
    """The fields of /proc/PID/stat and statm a sample needs (proc(5)). A tuple: one is built
    per process and tick (1,000 a second at 1,000 instances), at half a dataclass's cost."""

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
    fields = _stat_fields(data)
    if fields is None:
        return None
    return _proc_stat(fields, _read_proc(f"/proc/{pid}/statm"))


def parse_stat(data: bytes, statm: Callable[[], bytes | None]) -> ProcStat | None:
    """The fields of /proc/PID/stat's text `data`, with statm's (read only when it is needed:
    not for a zombie); None for a zombie."""
    fields = _stat_fields(data)
    return None if fields is None else _proc_stat(fields, statm())


def _stat_fields(data: bytes) -> list[bytes] | None:
    """/proc/PID/stat's fields from the state on (field 3); None for a zombie."""
    # The command name is in parentheses and may itself contain spaces or ')': the fields are
    # counted after the last ')'.
    fields = data[data.rfind(b")") + 2 :].split()
    if fields[:1] == [b"Z"]:
        return None  # a zombie: it has exited, only its exit status is left to reap
    return fields


def _proc_stat(fields: list[bytes], resident: bytes | None) -> ProcStat | None:
    try:
        return ProcStat(
            int(fields[11]) + int(fields[12]),  # utime, stime (fields 14, 15)
            int(fields[17]),  # num_threads (20)
            int(fields[19]),  # starttime (22)
            int(resident.split()[1]) if resident else 0,  # resident (what psutil reads)
        )
    except (IndexError, ValueError):
        return None


class ProcFiles:
    """/proc/PID/stat and statm of the processes sampled, and their fd folder, kept open:
    the files are read again with `pread` and the folder's size (its fd count) taken with
    `fstat`, one syscall each instead of open, read and close (and the path lookup of
    /proc/PID), under half the CPU at 1,000 instances. An open file names its process, not
    its pid: once that process is gone its reads fail (ESRCH), and a reused pid is opened
    afresh. Files are held for up to `budget` processes (3 fds each; by default a quarter of
    the open-file limit in effect when they are opened, so after the daemon raised it: half is
    the clients', the rest the engines' pipes); past it, or when an open fails, a process is
    read by path."""

    def __init__(self, budget: int | None = None) -> None:
        self._budget = budget
        self._open: dict[int, tuple[int, int, int]] = {}

    @property
    def budget(self) -> int:
        if self._budget is not None:
            return self._budget
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0] // (3 * HELD_FILES_SHARE)

    def read(self, pid: int) -> ProcStat | None:
        fds = self._open.get(pid)
        if fds is None:
            if len(self._open) >= self.budget:
                return read_stat(pid)
            fds = self._hold(pid)
            if fds is None:  # gone, or no fd to spare (EMFILE): by path
                return read_stat(pid)
        try:
            fields = _stat_fields(os.pread(fds[0], 4096, 0))
            if fields is None:
                return None
            return _proc_stat(fields, os.pread(fds[1], 4096, 0))
        except OSError:  # the process is gone (ESRCH)
            self._drop(pid)
            return None

    def count_fds(self, pid: int) -> int:
        """The open fds of `pid` (as `count_fds`), through its held folder if any."""
        fds = self._open.get(pid)
        if fds is None:
            return count_fds(pid)
        try:
            return os.fstat(fds[2]).st_size or len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            return 0

    def keep_only(self, pids: Iterable[int]) -> None:
        """Close the files of every process but `pids` (those read this tick)."""
        for pid in self._open.keys() - set(pids):
            self._drop(pid)

    def close(self) -> None:
        self.keep_only(())

    def _hold(self, pid: int) -> tuple[int, int, int] | None:
        held: list[int] = []
        try:
            for name, flags in (("stat", 0), ("statm", 0), ("fd", os.O_DIRECTORY)):
                held.append(os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC | flags))
        except OSError:
            for fd in held:
                os.close(fd)
            return None
        fds = self._open[pid] = (held[0], held[1], held[2])
        return fds

    def _drop(self, pid: int) -> None:
        for fd in self._open.pop(pid, ()):
            os.close(fd)


def count_fds(pid: int) -> int:
    """The open fds of `pid`: the size of /proc/PID/fd (Linux 6.2 and later count them there,
    a stat instead of a listing), else the length of its listing."""
    where = f"/proc/{pid}/fd"
    try:
        return os.stat(where).st_size or len(os.listdir(where))
    except OSError:
        return 0


class QuietSchedule:
    """Which instances to read at a tick: each at every tick while its readings change, and
    every `stride` ticks once `after` readings in a row were the same, until one differs.
    Plain values: a key (the instance's leader pid), tick numbers and readings."""

    def __init__(self, after: int = QUIET_AFTER, stride: int = QUIET_STRIDE) -> None:
        self.after = after
        self.stride = stride
        # key -> (last reading, readings in a row that were the same, tick it is due at)
        self._state: dict[int, tuple[object, int, int]] = {}

    def due(self, key: int, tick: int) -> bool:
        state = self._state.get(key)
        return state is None or tick >= state[2]

    def read(self, key: int, tick: int, reading: object) -> None:
        """`key` was read at `tick`, and gave `reading`."""
        state = self._state.get(key)
        same = 0 if state is None or state[0] != reading else state[1] + 1
        self._state[key] = (reading, same, tick + (self.stride if same >= self.after else 1))

    def keep_only(self, keys: Iterable[int]) -> None:
        """Forget every key but `keys`."""
        for key in self._state.keys() - set(keys):
            del self._state[key]


class Monitor:
    """Samples the pids in `targets` every `interval` seconds and reports through `on_samples`
    (`tick=True`); a quiet instance is read less often (`QuietSchedule`), and at once when a
    reader asks for fresh readings (`fresh`, then reported with `tick=False`)."""

    def __init__(
        self,
        interval: float,
        loop: asyncio.AbstractEventLoop,
        on_samples: Callable[[dict[str, Sample], HostSample | None, bool], None],
    ) -> None:
        self.interval = interval
        self.targets: dict[str, int] = {}
        self._loop = loop
        self._on_samples = on_samples
        self._quiet = QuietSchedule()
        self._last: dict[str, Sample] = {}  # each target's latest reading
        # When the oldest reading kept for a quiet instance in the last tick was taken (inf:
        # none kept): what `fresh` compares with the interval.
        self._kept_since = float("inf")
        self._passed_at = time.monotonic()  # when the last reading pass ended
        # Readers waiting for a reading of everything (`fresh`), and whether one is due.
        self._lock = threading.Lock()
        self._waiters: list[asyncio.Future[None]] = []
        self._full = False
        self._wake = threading.Event()
        # (start ticks, CPU ticks, when) of each pid's last reading: its CPU % is the ticks
        # used since then over the time since then (what psutil's cpu_percent computes).
        self._procs: dict[int, tuple[int, int, float]] = {}
        self._tree: dict[int, list[int]] = {}
        self._threads: dict[int, int] = {}  # each pid's thread count at its last reading
        self._files = ProcFiles()
        self._tick = 0
        self._boot = boot_time()
        self._host = HostReader()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engctl-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._files.close()

    def set_targets(self, targets: dict[str, int]) -> None:
        """Replace the watched pids; a new dict object, so the thread sees it whole or not."""
        self.targets = targets

    def stale(self) -> bool:
        """Whether a quiet instance's kept reading is older than the interval, or the monitor
        is late (its last pass ended more than two intervals ago: a loaded machine): the
        others are read every interval."""
        now = time.monotonic()
        late = now - self._passed_at > 2 * self.interval
        return (now - self._kept_since > self.interval or late) and self._thread.is_alive()

    async def fresh(self) -> None:
        """Return once every target has a reading no older than the interval: at once unless
        it is `stale`, else after a reading of every target (by the monitor's thread: the loop
        is not blocked). Gives up waiting after a few intervals (a monitor that stopped)."""
        if not self.stale():
            return
        done: asyncio.Future[None] = self._loop.create_future()
        with self._lock:
            self._waiters.append(done)
            self._full = True
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(done), max(1.0, 3 * self.interval))

    def _run(self) -> None:
        next_at = time.monotonic() + self.interval
        while True:
            self._wake.wait(max(0.0, next_at - time.monotonic()))
            if self._stop.is_set():
                return
            with self._lock:
                self._wake.clear()
                full, self._full = self._full, False
                waiters, self._waiters = self._waiters, []
            tick = time.monotonic() >= next_at
            if not (tick or full):
                continue
            try:
                samples = self.sample_once(full=full)
                host = self._host.read() if tick else None
            except Exception:  # never let the sampler die: log and try next tick
                log.exception("sampling failed")
                samples, host = None, None
            if tick:
                next_at = time.monotonic() + self.interval
            with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
                self._loop.call_soon_threadsafe(self._deliver, samples, host, tick, waiters)

    def _deliver(
        self,
        samples: dict[str, Sample] | None,
        host: HostSample | None,
        tick: bool,
        waiters: list[asyncio.Future[None]],
    ) -> None:
        try:
            if samples is not None:
                self._on_samples(samples, host, tick)
        finally:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def sample_once(self, full: bool = True) -> dict[str, Sample]:
        """One reading of every target (`full`), or of those due by the quiet schedule with
        the kept readings of the others; vanished processes are skipped, never raised."""
        targets = self.targets
        if self._tick % DISCOVER_EVERY == 0 or set(targets.values()) - set(self._tree):
            self._tree = tree_of(targets.values(), self._threads)
        tick = self._tick
        self._tick += 1
        procs, threads = self._procs, self._threads
        seen: dict[int, tuple[int, int, float]] = {}
        out: dict[str, Sample] = {}
        quiet, latest = self._quiet, self._last
        kept_since = float("inf")
        # Looked up once, not per process: this loop runs 1,000 times a second at 1,000.
        read, count_fds, tree, monotonic = (
            self._files.read,
            self._files.count_fds,
            self._tree,
            time.monotonic,
        )
        for inst_id, pid in targets.items():
            descendants = tree.get(pid)
            pids = (pid, *descendants) if descendants else (pid,)
            kept = latest.get(inst_id)
            if not full and kept is not None and kept.pid == pid and not quiet.due(pid, tick):
                out[inst_id] = kept  # idle: what a reading would give, as of `taken`
                kept_since = min(kept_since, kept.taken)
                for p_id in pids:  # their CPU baselines and held files stay
                    if (baseline := procs.get(p_id)) is not None:
                        seen[p_id] = baseline
                continue
            sample = Sample(pid=pid, taken=monotonic())
            reading: list[object] = []
            for i, p_id in enumerate(pids):
                stat = read(p_id)
                if stat is None:
                    continue
                now = monotonic()
                last = procs.get(p_id)
                if last is not None and last[0] == stat.start_ticks and now > last[2]:
                    used = (stat.cpu_ticks - last[1]) / CLOCK_TICKS
                    sample.cpu_percent += max(used, 0.0) / (now - last[2]) * 100
                seen[p_id] = (stat.start_ticks, stat.cpu_ticks, now)
                sample.rss_bytes += stat.rss_pages * PAGE_SIZE
                sample.threads += stat.threads
                threads[p_id] = stat.threads
                fds = count_fds(p_id)
                sample.fds += fds
                reading.append((p_id, stat, fds))
                if i > 0:
                    created = self._boot + stat.start_ticks / CLOCK_TICKS
                    sample.descendants.append((p_id, created))
            quiet.read(pid, tick, reading)
            out[inst_id] = latest[inst_id] = sample
        self._procs = seen  # the pids read this tick: the others have exited or left
        if len(threads) > len(seen):
            for pid in threads.keys() - seen.keys():
                del threads[pid]
        self._files.keep_only(seen)
        if len(latest) > len(out):
            for inst_id in latest.keys() - out.keys():
                del latest[inst_id]
        quiet.keep_only(targets.values())
        self._kept_since = kept_since
        self._passed_at = time.monotonic()
        return out


def _counters(data: bytes | None, fields: dict[bytes, int]) -> dict[bytes, int]:
    """`fields` (name -> kB) read from /proc/meminfo's text."""
    out: dict[bytes, int] = {}
    for line in (data or b"").splitlines():
        name, _, rest = line.partition(b":")
        if name in fields:
            out[name] = int(rest.split()[0]) * 1024
    return out


class HostReader:
    """The machine's figures, read from /proc as psutil's `cpu_percent(None)`,
    `virtual_memory`, `disk_io_counters` and `net_io_counters` read them."""

    def __init__(self) -> None:
        self._cpu: tuple[int, int] | None = None  # (busy, total) ticks at the last reading
        self._storage: dict[bytes, bool] = {}  # diskstats name -> a whole device (not a partition)

    def read(self) -> HostSample | None:
        """One reading; None where /proc lacks what it needs."""
        try:
            mem = _counters(_read_proc("/proc/meminfo"), {b"MemTotal": 0, b"MemAvailable": 0})
            read, written = self._disk()
            sent, received = _net()
            return HostSample(
                cpu_percent=self._cpu_percent(),
                mem_used=mem[b"MemTotal"] - mem[b"MemAvailable"],
                mem_total=mem[b"MemTotal"],
                disk_read=read,
                disk_write=written,
                net_sent=sent,
                net_recv=received,
            )
        except (KeyError, IndexError, ValueError, OSError):
            return None

    def _cpu_percent(self) -> float:
        """Busy share of every CPU since the last reading (0.0 at the first)."""
        data = _read_proc("/proc/stat") or b""
        ticks = [int(v) for v in data.split(b"\n", 1)[0].split()[1:]]
        # guest and guest_nice are counted in user and nice already; idle and iowait are idle.
        total = sum(ticks) - sum(ticks[8:10])
        busy = total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0)
        last, self._cpu = self._cpu, (busy, total)
        if last is None or total <= last[1]:
            return 0.0
        share = (busy - last[0]) / (total - last[1]) * 100
        return round(min(max(share, 0.0), 100.0), 1)

    def _disk(self) -> tuple[int, int]:
        """Bytes read and written by the whole devices of /proc/diskstats (partitions are
        counted in their device), in 512-byte sectors as the kernel counts them."""
        read = written = 0
        for line in (_read_proc_all("/proc/diskstats") or b"").splitlines():
            f = line.split()
            if len(f) < 14:
                continue
            name = f[2]
            whole = self._storage.get(name)
            if whole is None:
                path = "/sys/block/" + name.decode(errors="replace").replace("/", "!")
                whole = self._storage[name] = os.access(path, os.F_OK)
            if whole:
                read += int(f[5]) * 512
                written += int(f[9]) * 512
        return read, written


def _net() -> tuple[int, int]:
    """Bytes sent and received by every interface (/proc/net/dev)."""
    sent = received = 0
    for line in (_read_proc_all("/proc/net/dev") or b"").splitlines()[2:]:
        f = line.partition(b":")[2].split()
        received += int(f[0])
        sent += int(f[8])
    return sent, received


def _read_proc_all(path: str) -> bytes | None:
    """A /proc file of any size, None if it cannot be read."""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read()
    except OSError:
        return None
