"""Processes found through /proc rather than started: what is left of an instance's tree
after its leader exited (its group, descendants seen leaving it, orphans the daemon adopted
as subreaper, told apart by the marker in their environment) and a previous daemon's
instances; each known by (pid, create time), never by a pid alone, against pid reuse.

Mechanism only, as `process`; imports no other daemon module but `process` (which
processes it watches, and its signals).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable

from .process import (
    DAEMON_ID_ENV,
    GENERATION_ENV,
    INSTANCE_ENV,
    LAUNCH_ENV,
    group_alive,
    is_watched,
    signal_group,
)

# Units of /proc/PID/stat's start time (clock ticks since boot).
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def boot_time() -> float:
    """When the machine booted, in seconds since the epoch (/proc/stat's btime)."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return time.time() - time.monotonic()  # no /proc/stat: the monotonic clock's origin


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on, None when the process is gone. The command name
    before them is in parentheses and may itself contain spaces or ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb", buffering=0) as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].split()


def create_time(pid: int, boot: float | None = None) -> float | None:
    """When `pid` started (seconds since the epoch, as psutil's `create_time`); None when it
    is gone or a zombie. With the pid, it names a process against pid reuse."""
    fields = _stat_fields(pid)
    if not fields or fields[0] == b"Z":
        return None
    try:
        return (boot if boot is not None else boot_time()) + int(fields[19]) / CLOCK_TICKS
    except (IndexError, ValueError):
        return None


def _is(pid: int, created: float, boot: float | None = None) -> bool:
    """Whether `pid` still runs and is the process that started at `created`."""
    now = create_time(pid, boot)
    return now is not None and abs(now - created) < 0.01


def _environ(pid: int) -> dict[str, str]:
    """The environment `pid` started with (empty when it cannot be read)."""
    try:
        with open(f"/proc/{pid}/environ", "rb", buffering=0) as f:
            data = f.read()
    except OSError:
        return {}
    out = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def _real_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _pids() -> list[int]:
    """Every process of the machine."""
    return [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()]


def own_children() -> list[int] | None:
    """The daemon's children (adopted orphans among them: it is their subreaper), from the
    `children` file of each of its threads; None on a kernel without these files."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/self/task/{tid}/children", "rb") as f:
                out += map(int, f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/self/task/{tid}"):
                continue  # the thread ended meanwhile
            return None  # no CONFIG_PROC_CHILDREN
        except OSError:
            continue
    return out


def kill_tree_now(pgid: int, extra_pids: Iterable[tuple[int, float]] = ()) -> None:
    """SIGKILL a process group and any escaped descendants known by (pid, create_time)."""
    signal_group(pgid, signal.SIGKILL)
    boot = boot_time()
    for pid, created in extra_pids:
        # The create time guards against a recycled pid.
        if _is(pid, created, boot):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def adopted_orphans(marker: tuple[str, str, str]) -> list[tuple[int, float]]:
    """Children of the daemon that are not instances but carry `marker` (instance id,
    generation, launch token) in their environment.

    They are descendants that left the instance's process group (setsid) and were adopted
    when their parent died; identified by (pid, create time) against pid reuse.
    """
    instance_id, generation, launch = marker
    me = str(os.getpid()).encode()
    boot = boot_time()
    found = []
    # The daemon's own children, not every process of the machine: this runs on a thread
    # after each instance stops, and a scan of /proc in Python held the GIL for long enough
    # to stall the loop 4-8 ms (requests late in the middle of a rolling reload).
    children = own_children()
    for pid in _pids() if children is None else children:
        fields = _stat_fields(pid)
        if is_watched(pid) or not fields or fields[1:2] != [me]:
            continue
        env = _environ(pid)
        created = create_time(pid, boot)
        if (
            created is not None
            and env.get(INSTANCE_ENV) == instance_id
            and env.get(GENERATION_ENV) == generation
            and env.get(LAUNCH_ENV) == launch
        ):
            found.append((pid, created))
    return found


async def sweep_tree(
    pgid: int,
    escaped: list[tuple[int, float]],
    marker: tuple[str, str, str],
    grace: float,
    live_groups: Callable[[], set[int]],
) -> None:
    """After a group's leader exited: give what is left of its tree `grace` seconds, then
    SIGKILL it. "What is left" is the process group, `escaped` descendants (pid, create time)
    seen leaving it, and orphans carrying its `marker` (instance id, generation, launch) that the
    daemon adopted as subreaper, except those in a group of `live_groups()` (a successor's)."""
    children = own_children()  # some 10 small reads: on the loop
    if children is not None and all(is_watched(pid) for pid in children):
        # No child but instances: nothing was adopted, no thread needed. When a fleet stops,
        # each of its processes took a thread's round trip here, 2 KiB a moment each, and
        # what a daemon holds at such a peak stays its RSS (CPython keeps its arenas).
        found = []
    else:
        found = await asyncio.to_thread(adopted_orphans, marker)
    # The scan runs in a thread: a successor spawned meanwhile (a restart) carries the same
    # marker and may not have been registered yet when it was seen. Back on the loop it is:
    # keep out every process of a live instance's group.
    live = live_groups()
    adopted = [(p, ct) for p, ct in found if pgid_of(p) not in live]
    signal_pids(adopted, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (group_alive(pgid) or any_alive(adopted)):
        await asyncio.sleep(0.05)
    kill_tree_now(pgid, escaped + adopted)


def pgid_of(pid: int) -> int | None:
    """The process group of `pid`, None when it is gone."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def signal_pids(pids: Iterable[tuple[int, float]], sig: int) -> None:
    """Signal processes known by (pid, create time); vanished ones are skipped."""
    for pid, _created in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def any_alive(pids: Iterable[tuple[int, float]]) -> bool:
    """Whether any of the processes still runs (a zombie counts as gone)."""
    for pid, _created in pids:
        fields = _stat_fields(pid)
        if fields and fields[0] != b"Z":
            return True
    return False


def find_old_generation(daemon_id: str) -> list[tuple[int, float]]:
    """Processes of a previous daemon of this home, found by the marker in their environment,
    as (pid, create time)."""
    me = os.getpid()
    uid = os.getuid()
    boot = boot_time()
    found = []
    for pid in _pids():
        if pid == me or _real_uid(pid) != uid:
            continue
        if _environ(pid).get(DAEMON_ID_ENV) == daemon_id:
            created = create_time(pid, boot)
            if created is not None:
                found.append((pid, created))
    return found


async def end_old_generation(daemon_id: str, grace: float = 3.0) -> int:
    """Stop every process a killed daemon left behind: SIGTERM their groups, SIGKILL after `grace`.

    Runs before new instances start, so a service's port is free again.
    """
    procs = await asyncio.to_thread(find_old_generation, daemon_id)
    if not procs:
        return 0
    groups: set[int] = set()
    for pid, _created in procs:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(pid))
    signal_alive(procs, signal.SIGTERM)
    for g in groups:
        signal_group(g, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        boot = boot_time()
        if not any(_is(pid, created, boot) for pid, created in procs):
            break
        await asyncio.sleep(0.05)
    for g in groups:
        signal_group(g, signal.SIGKILL)
    signal_alive(procs, signal.SIGKILL)
    return len(procs)


def signal_alive(procs: Iterable[tuple[int, float]], sig: int) -> None:
    """Signal the processes known by (pid, create time) that still run (not a recycled pid)."""
    boot = boot_time()
    for pid, created in procs:
        if _is(pid, created, boot):
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
