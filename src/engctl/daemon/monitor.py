"""psutil sampling of every live instance, in a thread of its own so the event loop never waits.

Each tick reads CPU %, RSS, threads and fds of each instance's process and its descendants; the
descendant tree is rediscovered every few ticks from one pass over /proc rather than one per
instance. Results are handed to the loop with `call_soon_threadsafe`.

Mechanism: imports no other daemon module (the daemon applies what it reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

log = logging.getLogger("engctl.monitor")

# Descendants are rediscovered every this many ticks; engines rarely fork after start-up.
DISCOVER_EVERY = 5


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
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        # The command name is in parentheses and may itself contain spaces or ')'.
        rest = data[data.rfind(b")") + 2 :].split(b" ", 2)
        with contextlib.suppress(ValueError, IndexError):
            children[int(rest[1])].append(int(entry.name))
    return children


def descendants_of(pid: int, children: dict[int, list[int]]) -> list[int]:
    out: list[int] = []
    stack = list(children.get(pid, ()))
    while stack:
        p = stack.pop()
        out.append(p)
        stack.extend(children.get(p, ()))
    return out


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
        self._procs: dict[int, psutil.Process] = {}
        self._tree: dict[int, list[int]] = {}
        self._tick = 0
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

    def _proc(self, pid: int) -> psutil.Process | None:
        p = self._procs.get(pid)
        if p is None:
            try:
                p = psutil.Process(pid)
            except psutil.Error:
                return None
            self._procs[pid] = p
        return p

    def sample_once(self) -> dict[str, Sample]:
        """One reading of every target; vanished processes are skipped, never raised."""
        targets = self.targets
        if self._tick % DISCOVER_EVERY == 0 or set(targets.values()) - set(self._tree):
            children = ppid_map()
            self._tree = {pid: descendants_of(pid, children) for pid in targets.values()}
        self._tick += 1
        seen: set[int] = set()
        out: dict[str, Sample] = {}
        for inst_id, pid in targets.items():
            sample = Sample(pid=pid)
            for i, p_id in enumerate([pid, *self._tree.get(pid, ())]):
                p = self._proc(p_id)
                if p is None:
                    continue
                try:
                    with p.oneshot():
                        sample.cpu_percent += p.cpu_percent()
                        sample.rss_bytes += p.memory_info().rss
                        sample.threads += p.num_threads()
                        sample.fds += p.num_fds()
                        if i > 0:
                            sample.descendants.append((p_id, p.create_time()))
                except psutil.Error:
                    self._procs.pop(p_id, None)
                    continue
                seen.add(p_id)
            out[inst_id] = sample
        for stale in set(self._procs) - seen:
            del self._procs[stale]
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
