"""One OS process of an instance: launch it in its own process group (off the loop, on a
launcher thread), watch its exit, read its pipes, signal its group. Finding and ending what
is left of a tree after its leader exits is `proctree`'s.

Mechanism only: knows nothing of restart policies or states (that is `supervisor`), and
imports no other daemon module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

# Set in each engine's environment so a restarted daemon can find the old generation.
DAEMON_ID_ENV = "ENGCTL_DAEMON_ID"
INSTANCE_ENV = "ENGCTL_INSTANCE"
INSTANCE_INDEX_ENV = "ENGCTL_INSTANCE_INDEX"  # the k of NAME#k (PM2's NODE_APP_INSTANCE)
# The generation of the spec the process runs: a rollout's new and old process of one slot
# share ENGCTL_INSTANCE, not this.
GENERATION_ENV = "ENGCTL_GENERATION"
# A token per start of an instance: the search for a stopped process's adopted orphans takes
# only its own start's, never a restart of the same instance launched meanwhile (whose
# process may exist, on the launcher thread, before the loop knows of it).
LAUNCH_ENV = "ENGCTL_LAUNCH"


@dataclass(frozen=True)
class ExitStatus:
    """How a process ended: an exit code, or the signal that killed it."""

    code: int | None
    signal: str | None

    @classmethod
    def from_returncode(cls, rc: int) -> ExitStatus:
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = f"SIG{-rc}"
            return cls(None, name)
        return cls(rc, None)

    def describe(self) -> str:
        return f"killed by {self.signal}" if self.signal else f"exit code {self.code}"


class SpawnError(Exception):
    """The process could not be started (command missing, not executable, bad cwd).

    `transient` when the cause is the daemon's resources, not the command (out of file
    descriptors or processes): worth retrying, and no fault of the engine.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


# errnos of a spawn that failed for lack of resources (fds, processes, memory).
TRANSIENT_SPAWN_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.EAGAIN, errno.ENOMEM})


class Launched:
    """A process just launched, not yet watched: its Popen and the daemon's ends of its
    pipes, as fds (None where the child has no pipe)."""

    __slots__ = ("pid", "popen", "stderr", "stdin", "stdout")

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        stdin: int | None,
        stdout: int | None,
        stderr: int | None,
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr

    def close_pipe(self, fd: int | None) -> None:
        """Close the daemon's end `fd` of one of the pipes, once (None: nothing to close)."""
        if fd is None:
            return
        if fd == self.stdin:
            self.stdin = None
        elif fd == self.stdout:
            self.stdout = None
        elif fd == self.stderr:
            self.stderr = None
        else:
            return  # closed already: the number may be another file's by now
        with contextlib.suppress(OSError):
            os.close(fd)

    def close_pipes(self) -> None:
        """Close the daemon's end of every pipe still open (each once)."""
        for fd in (self.stdin, self.stdout, self.stderr):
            self.close_pipe(fd)


class ChildProcess(Launched):
    """A spawned process: its pid (also its process group id), the daemon's ends of its pipes
    (fds: a file object each was 240 B more) and a callback on exit, called by
    `reap_children` on the SIGCHLD of its exit (no fd, reader or timer per process)."""

    __slots__ = ("_on_exit", "exit_status", "pgid", "started_at", "started_mono")

    def __init__(
        self, launched: Launched, on_exit: Callable[[ChildProcess, ExitStatus], None]
    ) -> None:
        super().__init__(launched.popen, launched.stdin, launched.stdout, launched.stderr)
        self.pgid = self.pid  # start_new_session made it the leader of its own group
        self.started_at = time.time()
        self.started_mono = time.monotonic()
        self.exit_status: ExitStatus | None = None
        self._on_exit = on_exit
        _children[self.pid] = self

    def reap(self) -> None:
        """Collect the exit status if the process has ended (idempotent)."""
        if self.exit_status is not None:
            return
        rc = self.popen.poll()
        if rc is None:  # still running: nothing to collect yet
            return
        _children.pop(self.pid, None)
        self.exit_status = ExitStatus.from_returncode(rc)
        self._on_exit(self, self.exit_status)

    @property
    def alive(self) -> bool:
        return self.exit_status is None

    def signal_group(self, sig: int) -> bool:
        """Send `sig` to the whole process group; False if nothing is left in it."""
        return signal_group(self.pgid, sig)


# Live instance processes by pid, so the SIGCHLD reaper hands their status to them.
_children: dict[int, ChildProcess] = {}


def is_watched(pid: int) -> bool:
    """Whether `pid` is a live instance process the daemon watches (not an adopted orphan)."""
    return pid in _children


PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt the orphans of engine trees (Linux prctl), as an init would.

    Orphans are then reaped at once by `reap_children`, so a group whose leader died is seen
    empty as soon as it is, even where PID 1 is slow to reap or absent (containers).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def reap_children() -> None:
    """On SIGCHLD: reap every exited child, instances through their ChildProcess.

    Every process the daemon starts must go through `spawn_soon`, or its status is taken
    here.
    """
    global _reap_deferred
    while True:
        try:
            # WNOWAIT peeks: an instance's status must reach its own ChildProcess.
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        child = _children.get(info.si_pid)
        if child is None and _landings:
            # Maybe a launch that exited before it is watched: its status is its own.
            _reap_deferred = True
            return
        if child is not None:
            child.reap()
            if child.exit_status is None:  # not reapable after all: never spin
                return
        else:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.si_pid, os.WNOHANG)


def read_available(fd: int, size: int = 262144) -> bytes | None:
    """What a non-blocking pipe holds now: bytes, b"" at EOF (or a broken pipe), None if
    nothing is there yet (a spurious wake-up)."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def read_output(
    loop: asyncio.AbstractEventLoop,
    proc: ChildProcess,
    stdout: Callable[[bytes], None],
    stderr: Callable[[bytes], None],
) -> None:
    """Hand what `proc` writes on its stdout and stderr pipes to `stdout` and `stderr` as it
    arrives, then b"" once at EOF (when the pipe is closed). Never blocks the loop."""
    for fd, consumer in ((proc.stderr, stderr), (proc.stdout, stdout)):
        if fd is None:
            continue
        os.set_blocking(fd, False)
        loop.add_reader(fd, _read_pipe, loop, proc, fd, consumer)


def _read_pipe(
    loop: asyncio.AbstractEventLoop,
    proc: ChildProcess,
    fd: int,
    consumer: Callable[[bytes], None],
) -> None:
    data = read_available(fd)
    if data is None:
        return
    if data:
        consumer(data)
        return
    loop.remove_reader(fd)
    consumer(b"")
    proc.close_pipe(fd)


def signal_group(pgid: int, sig: int) -> bool:
    """killpg that treats a vanished group as done rather than an error."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the group."""
    return signal_group(pgid, 0)


def launch(
    argv: list[str],
    *,
    cwd: str | None,
    env: Mapping[str, str],
    pipe_stdin: bool,
    stdout_to_pipe: bool,
) -> Launched:
    """Fork and exec `argv` as the leader of a new session; stderr is always a pipe to the
    daemon. Returns once the child has exec'd: off the loop, that is `spawn_soon`'s job.

    Every way this can fail raises SpawnError, and then no process is left running and no
    pipe open.
    """
    # The pipes are the daemon's own, read and written through their fds (os.read,
    # os.write): Popen's file objects for them were 240 B each, per pipe and instance.
    ours: list[int | None] = [None, None, None]  # stdin, stdout, stderr: the daemon's ends
    theirs: list[int] = []  # the child's ends, closed here once it has them
    try:
        try:
            if pipe_stdin:
                r, w = os.pipe2(os.O_CLOEXEC)
                theirs.append(r)
                ours[0] = w
            if stdout_to_pipe:
                r, w = os.pipe2(os.O_CLOEXEC)
                ours[1] = r
                theirs.append(w)
            r, w = os.pipe2(os.O_CLOEXEC)
            ours[2] = r
            theirs.append(w)
            with contextlib.suppress(OSError, AttributeError):  # AttributeError: not Linux
                fcntl.fcntl(r, fcntl.F_SETPIPE_SZ, STDERR_PIPE_BYTES)
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=theirs[0] if pipe_stdin else subprocess.DEVNULL,
                stdout=theirs[-2] if stdout_to_pipe else subprocess.DEVNULL,
                stderr=theirs[-1],
                start_new_session=True,
                close_fds=True,
            )
        finally:
            for fd in theirs:
                os.close(fd)
    except OSError as exc:
        _close_all(ours)
        detail = exc.strerror or str(exc)
        target = exc.filename or argv[0]
        raise SpawnError(
            f"cannot start {target!r}: {detail}", transient=exc.errno in TRANSIENT_SPAWN_ERRNOS
        ) from exc
    except (ValueError, TypeError, subprocess.SubprocessError) as exc:
        # e.g. "embedded null byte": refused before any fork, so nothing runs.
        _close_all(ours)
        raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from exc
    return Launched(popen, ours[0], ours[1], ours[2])


def _close_all(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


# stderr, a log read at once, needs one page, not 64 KiB: Linux counts pipe pages per user
# (fs.pipe-user-pages-soft, 16,384), and past it every new pipe of the user gets 8 KiB; three
# 64 KiB pipes a worker reached it at 341 workers (now 496, services 963).
STDERR_PIPE_BYTES = 4096


def _discard(launched: Launched) -> None:
    """Kill and reap a launched process nobody will watch, and close its pipes."""
    signal_group(launched.pid, signal.SIGKILL)
    launched.popen.wait()
    launched.close_pipes()


# Threads that launch processes: a fork and exec waits until the child has exec'd, 0.5 ms on
# an idle machine but 3-19 ms on two busy cores (the child waits for a CPU); on the loop,
# every request in flight waited with it, at each step of a rolling reload. Threads start
# only as launches overlap (one is enough but for bursts of oneshot runs).
LAUNCH_THREADS = 4
_launcher: ThreadPoolExecutor | None = None
# Launches waiting for a launcher thread, oldest first, each a plain callable; the pool's own
# queue held a future with its lock and condition for each (about 1 KiB), and a fleet that
# starts at once queued them all: what the daemon holds at such a peak stays its RSS (CPython
# keeps its arenas). Each launcher thread takes launches from here until none is left.
_waiting: collections.deque[Callable[[], None]] = collections.deque()
_waiting_lock = threading.Lock()
_taking = 0  # launcher threads taking launches from `_waiting`
# Launches forked, or about to be, and not yet watched: until they are, `reap_children`
# cannot tell an exited one from an orphan, and leaves unknown children for later.
_landings: set[asyncio.Future[None]] = set()
_reap_deferred = False


def spawn_soon(
    argv: list[str],
    *,
    cwd: str | None,
    env: Mapping[str, str],
    pipe_stdin: bool,
    stdout_to_pipe: bool,
    loop: asyncio.AbstractEventLoop,
    on_exit: Callable[[ChildProcess, ExitStatus], None],
    then: Callable[[ChildProcess | SpawnError], None],
) -> None:
    """`launch` on a launcher thread, then watched from the loop (its exit reaches `on_exit`
    through `reap_children`, which the daemon runs on SIGCHLD): the loop goes on while the
    child execs. `then` gets the watched process, or the SpawnError, on the loop (never
    before this returns, and before `on_exit`)."""
    global _launcher
    if _launcher is None:
        _launcher = ThreadPoolExecutor(LAUNCH_THREADS, thread_name_prefix="engctl-launch")
    landing: asyncio.Future[None] = loop.create_future()
    _landings.add(landing)

    def landed(done: Future[Launched]) -> None:  # on the loop
        global _reap_deferred
        result: ChildProcess | SpawnError
        try:
            result = ChildProcess(done.result(), on_exit)
        except SpawnError as exc:
            result = exc
        except Exception as exc:  # the pool shut down: nothing was launched
            result = SpawnError(f"cannot start {argv[0]!r}: {exc}")
        _landings.discard(landing)
        landing.set_result(None)
        try:
            then(result)
        finally:
            if _reap_deferred and not _landings:
                _reap_deferred = False
                reap_children()

    def hand_back(done: Future[Launched]) -> None:  # on the launcher thread
        try:
            loop.call_soon_threadsafe(landed, done)
        except RuntimeError:  # the loop is closed: a process nobody can watch must not live
            if not done.cancelled() and done.exception() is None:
                _discard(done.result())

    def run() -> None:  # on a launcher thread
        done: Future[Launched] = Future()
        try:
            done.set_result(
                launch(argv, cwd=cwd, env=env, pipe_stdin=pipe_stdin, stdout_to_pipe=stdout_to_pipe)
            )
        except BaseException as exc:  # as the pool's own work items do
            done.set_exception(exc)
        hand_back(done)

    try:
        _queue_launch(_launcher, run)
    except RuntimeError as exc:  # interpreter shutting down: no new thread
        failed: Future[Launched] = Future()
        failed.set_exception(exc)
        loop.call_soon(landed, failed)


def _queue_launch(pool: ThreadPoolExecutor, run: Callable[[], None]) -> None:
    """Queue `run` for a launcher thread, starting one if fewer than LAUNCH_THREADS take
    launches; RuntimeError (and `run` taken back) when no thread can take it."""
    global _taking
    with _waiting_lock:
        _waiting.append(run)
        if _taking >= LAUNCH_THREADS:
            return
        _taking += 1
    try:
        pool.submit(_take_launches)
    except RuntimeError:
        with _waiting_lock:
            _taking -= 1
            if _taking:
                return  # a thread that still takes launches runs it
            _waiting.remove(run)
        raise


def _take_launches() -> None:
    """On a launcher thread: run waiting launches until none is left."""
    global _taking
    while True:
        with _waiting_lock:
            if not _waiting:
                _taking -= 1
                return
            run = _waiting.popleft()
        try:
            run()
        except BaseException:
            # Never seen (`run` catches what a launch raises), but a thread that left
            # without its count would leave launches waiting for good.
            with _waiting_lock:
                _taking -= 1
            raise


async def launches_landed(timeout: float) -> None:
    """Wait (up to `timeout`) until every launch under way is watched or has failed: the
    daemon's exit must not leave a process it never saw."""
    if _landings:
        await asyncio.wait(set(_landings), timeout=timeout)
