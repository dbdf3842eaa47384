"""Unit tests of process-tree discovery and one psutil sampling pass on real processes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from engctl.daemon import monitor as monitor_mod
from engctl.daemon.monitor import Monitor, descendants_of, ppid_map


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A shell in its own process group with one `sleep` grandchild: (child, grandchild pid)."""
    child = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 60 & echo $!; wait"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    grandchild: psutil.Process | None = None
    try:
        assert child.stdout is not None
        grandchild = psutil.Process(int(child.stdout.readline()))
        yield child, grandchild.pid
    finally:
        # Kill the grandchild first so the shell reaps it and exits: no orphan for init.
        # psutil refuses to signal a pid that was reused since.
        if grandchild is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                grandchild.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


@pytest.fixture
def monitor() -> Iterator[Monitor]:
    """A monitor that is never started: tests call sample_once themselves."""
    loop = asyncio.new_event_loop()
    try:
        yield Monitor(1.0, loop, lambda samples, host, tick: None)
    finally:
        loop.close()


def test_ppid_map_finds_this_process_under_its_parent() -> None:
    """One pass over /proc lists this test process among its parent's children."""
    assert os.getpid() in ppid_map()[os.getppid()]


def test_ppid_map_finds_a_child_and_grandchild(tree: tuple[subprocess.Popen[bytes], int]) -> None:
    """A child started here and its own child both appear under their parents."""
    child, grandchild = tree
    children = ppid_map()
    assert child.pid in children[os.getpid()]
    assert grandchild in children[child.pid]
    assert grandchild in descendants_of(os.getpid(), children)


def test_descendants_of_walks_the_whole_subtree() -> None:
    """Every process below a pid is found, at any depth, and nothing outside it."""
    children = {1: [2, 3], 2: [4], 4: [5, 6], 9: [10], 3: []}
    assert sorted(descendants_of(1, children)) == [2, 3, 4, 5, 6]
    assert sorted(descendants_of(4, children)) == [5, 6]
    assert descendants_of(5, children) == []
    assert descendants_of(42, children) == []


def test_sample_once_reads_a_real_process_tree(
    tree: tuple[subprocess.Popen[bytes], int], monitor: Monitor
) -> None:
    """A sample of a live process has memory, threads and fds, and lists its grandchild."""
    child, grandchild = tree
    monitor.set_targets({"web#0": child.pid})
    samples = monitor.sample_once()
    assert set(samples) == {"web#0"}
    s = samples["web#0"]
    assert s.rss_bytes > 0
    assert s.threads >= 2  # the shell and the sleep
    assert s.fds > 0
    assert [pid for pid, _ in s.descendants] == [grandchild]
    assert s.descendants[0][1] == pytest.approx(psutil.Process(grandchild).create_time())


def test_sample_once_includes_descendants_in_rss(
    tree: tuple[subprocess.Popen[bytes], int], monitor: Monitor
) -> None:
    """The RSS of an instance counts its descendants too."""
    child, _ = tree
    monitor.set_targets({"web#0": child.pid})
    total = monitor.sample_once()["web#0"].rss_bytes
    own = psutil.Process(child.pid).memory_info().rss
    assert total > own


def test_sample_once_skips_vanished_processes(monitor: Monitor) -> None:
    """A target whose process is gone gives an empty sample instead of an error."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    monitor.set_targets({"gone#0": gone.pid})
    s = monitor.sample_once()["gone#0"]
    assert (s.rss_bytes, s.threads, s.fds, s.descendants) == (0, 0, 0, [])


def test_sample_once_forgets_processes_that_exit(
    tree: tuple[subprocess.Popen[bytes], int], monitor: Monitor
) -> None:
    """After a target exits, the next sample is empty for it and keeps no cached handle."""
    child, grandchild = tree
    monitor.set_targets({"web#0": child.pid})
    assert monitor.sample_once()["web#0"].rss_bytes > 0
    psutil.Process(grandchild).kill()  # the shell reaps it, then exits from `wait`
    child.wait(5)
    assert monitor.sample_once()["web#0"].rss_bytes == 0
    assert child.pid not in monitor._procs


def test_sample_once_with_no_targets_is_empty(monitor: Monitor) -> None:
    """No targets, no samples."""
    assert monitor.sample_once() == {}


def test_one_stat_read_gives_what_psutil_reads(monitor: Monitor) -> None:
    """Issue 13.1: the sampler's one read of /proc/PID/stat per process gives the RSS, threads,
    fds and CPU % that psutil reads in four, and a spinning process shows its CPU."""
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import threading,time\nwhile True: pass"],
        stdout=subprocess.DEVNULL,
    )
    try:
        monitor.set_targets({"spin#0": spinner.pid})
        monitor.sample_once()  # the first reading of a process has no CPU % yet (as psutil)
        p = psutil.Process(spinner.pid)
        deadline = time.monotonic() + 10
        while True:
            time.sleep(0.2)
            s = monitor.sample_once()["spin#0"]
            with p.oneshot():
                rss, threads, fds = p.memory_info().rss, p.num_threads(), p.num_fds()
            if s.cpu_percent > 20 or time.monotonic() > deadline:
                break
        assert s.cpu_percent > 20
        assert abs(s.rss_bytes - rss) <= 1 << 20
        assert (s.threads, s.fds) == (threads, fds)
    finally:
        spinner.kill()
        spinner.wait()


def test_children_files_find_the_tree_the_ppid_scan_finds(
    tree: tuple[subprocess.Popen[bytes], int],
) -> None:
    """Issue 13.1: the descendants read from each process's `children` files (a few reads per
    instance) are those one pass over every process of /proc finds (what idle hosts paid for)."""
    child, grandchild = tree
    assert monitor_mod.HAS_CHILDREN_FILES
    scanned = descendants_of(child.pid, ppid_map())
    assert grandchild in scanned
    assert sorted(monitor_mod.tree_of([child.pid])[child.pid]) == sorted(scanned)
    assert child.pid in monitor_mod.children_of(os.getpid())


def test_host_reading_is_what_psutil_reads() -> None:
    """The host's figures come from /proc as psutil computes them: memory used and total,
    disk and network byte counters (read between two psutil readings), CPU % in 0..100."""
    reader = monitor_mod.HostReader()
    assert reader.read() is not None
    before_disk, before_net = psutil.disk_io_counters(), psutil.net_io_counters()
    host = reader.read()
    after_disk, after_net = psutil.disk_io_counters(), psutil.net_io_counters()
    mem = psutil.virtual_memory()
    assert host is not None
    assert host.mem_total == mem.total
    assert abs(host.mem_used - (mem.total - mem.available)) < 64 * 2**20
    if before_disk is not None and after_disk is not None:
        assert before_disk.read_bytes <= host.disk_read <= after_disk.read_bytes
        assert before_disk.write_bytes <= host.disk_write <= after_disk.write_bytes
    assert before_net.bytes_sent <= host.net_sent <= after_net.bytes_sent
    assert before_net.bytes_recv <= host.net_recv <= after_net.bytes_recv
    assert 0.0 <= host.cpu_percent <= 100.0


def test_boot_time_is_psutils() -> None:
    from engctl.daemon.proctree import boot_time

    assert boot_time() == psutil.boot_time()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_held_proc_files_read_what_a_fresh_read_gives_and_close_when_it_exits() -> None:
    """The monitor keeps /proc/PID/stat, statm and fd open and reads them again: the same
    figures as a read by path; once the process is gone its read is None and all three files
    are closed."""
    child = subprocess.Popen(["sleep", "60"])
    files = monitor_mod.ProcFiles(budget=10)
    before = _open_fds()
    try:
        held = files.read(child.pid)
        fresh = monitor_mod.read_stat(child.pid)
        assert held is not None and fresh is not None
        assert (held.start_ticks, held.threads) == (fresh.start_ticks, fresh.threads)
        assert files.count_fds(child.pid) == monitor_mod.count_fds(child.pid)
        assert files.read(child.pid) is not None  # read again through the open files
        assert _open_fds() == before + 3
    finally:
        child.kill()
        child.wait()
    assert files.read(child.pid) is None
    assert _open_fds() == before


def test_held_proc_files_stay_within_their_budget() -> None:
    """Past its budget of processes, a process is read by path and nothing more is held."""
    child = subprocess.Popen(["sleep", "60"])
    files = monitor_mod.ProcFiles(budget=0)
    before = _open_fds()
    try:
        assert files.read(child.pid) is not None
        assert _open_fds() == before
    finally:
        child.kill()
        child.wait()


def test_sample_once_closes_the_files_of_processes_no_longer_targets(monitor: Monitor) -> None:
    child = subprocess.Popen(["sleep", "60"])
    try:
        monitor.set_targets({"a#0": child.pid})
        before = _open_fds()
        monitor.sample_once()
        assert _open_fds() == before + 3
        monitor.set_targets({})
        monitor.sample_once()
        assert _open_fds() == before
    finally:
        child.kill()
        child.wait()


def test_quiet_schedule_reads_a_changing_instance_every_tick() -> None:
    """Issue 13.1: readings that change keep an instance read at every tick."""
    q = monitor_mod.QuietSchedule(after=3, stride=4)
    for tick in range(20):
        assert q.due(7, tick)
        q.read(7, tick, ("cpu", tick))


def test_quiet_schedule_backs_off_after_same_readings_and_returns_on_a_change() -> None:
    """Issue 13.1: after `after` same readings in a row an instance is read every `stride`
    ticks; the first reading that differs brings it back to every tick."""
    q = monitor_mod.QuietSchedule(after=3, stride=4)
    read_at = []
    for tick in range(30):
        if q.due(1, tick):
            read_at.append(tick)
            q.read(1, tick, "busy" if tick >= 15 else "idle")
    # 0 (first), 1, 2, 3 (the third same in a row): then every 4th; at 15 it differs: every
    # tick until three more came out the same, then every 4th again.
    assert read_at == [0, 1, 2, 3, 7, 11, 15, 16, 17, 18, 22, 26]


def test_quiet_schedule_forgets_departed_keys() -> None:
    q = monitor_mod.QuietSchedule(after=1, stride=10)
    q.read(1, 0, "x")
    q.read(1, 1, "x")
    assert not q.due(1, 2)
    q.keep_only([])
    assert q.due(1, 2)


def test_an_idle_instance_keeps_its_reading_and_a_full_reading_takes_it_again(
    monitor: Monitor,
) -> None:
    """Issue 13.1: a sleeping process is read every tick until QUIET_AFTER readings were the
    same, then its reading is kept (the same object, with the time it was taken) between
    every QUIET_STRIDE-th tick; `full` reads it regardless; a busy process is read each tick."""
    idle = subprocess.Popen(["sleep", "60"])
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        monitor.set_targets({"idle#0": idle.pid, "busy#0": busy.pid})

        def tick() -> dict[str, monitor_mod.Sample]:
            # Ticks some CPU clock ticks apart (the busy process uses some between them), as
            # the monitor's are an interval apart.
            time.sleep(0.05)
            return monitor.sample_once(full=False)

        ticks = [tick() for _ in range(monitor_mod.QUIET_AFTER + 1)]
        for _ in range(30):  # a process just started may change a few more times
            ticks.append(tick())
            if ticks[-1]["idle#0"] is ticks[-2]["idle#0"]:
                break
        kept = ticks[-2]["idle#0"]
        assert ticks[-1]["idle#0"] is kept, "the idle process never came out the same"
        assert all(a["busy#0"] is not b["busy#0"] for a, b in itertools.pairwise(ticks))
        assert monitor._kept_since == kept.taken
        # Kept until its stride is over, then read again.
        later = [tick() for _ in range(monitor_mod.QUIET_STRIDE)]
        assert any(s["idle#0"] is not kept for s in later)
        kept = later[-1]["idle#0"]
        assert monitor.sample_once(full=True)["idle#0"] is not kept
        assert monitor._kept_since == float("inf")
    finally:
        for proc in (idle, busy):
            proc.kill()
            proc.wait()


def test_held_files_budget_follows_the_open_file_limit_in_effect() -> None:
    """Issue 13.1 (regression): the budget was fixed when the monitor was made, before the
    daemon raises its soft open-file limit (1,024 on most systems) to the hard one: 42
    processes' files held where thousands could be, the rest read by path each tick."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip(f"the hard open-file limit is {hard}: nothing to raise it to")
    high = hard if hard != resource.RLIM_INFINITY else 1 << 20
    files = monitor_mod.ProcFiles()
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))
        assert files.budget == 1024 // 12
        resource.setrlimit(resource.RLIMIT_NOFILE, (high, hard))
        assert files.budget == high // 12
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_children_of_a_one_thread_process_are_read_from_its_main_thread_alone(
    tree: tuple[subprocess.Popen[bytes], int],
) -> None:
    """Issue 13.1: with its thread count known to be 1, a process's children come from one
    file (no listing of its threads), and they are the same ones."""
    child, grandchild = tree
    assert monitor_mod.children_of(child.pid, threads=1) == [grandchild]
    assert monitor_mod.children_of(child.pid) == [grandchild]
    assert monitor_mod.tree_of([os.getpid()], {child.pid: 1})[os.getpid()].count(grandchild) == 1
