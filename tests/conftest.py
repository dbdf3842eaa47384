"""Fixtures: a private ENGCTL_HOME per test, a real daemon in it, and a check that every
process a test started (daemons, engines, grandchildren) is gone when it ends."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import psutil
import pytest
from hypothesis import settings

from engctl.client import Client
from engctl.paths import Paths, resolve_paths
from tests.prestart import Starter

if TYPE_CHECKING:
    import pexpect

ENGINES = Path(__file__).parent / "engines"
PY = sys.executable
# `Home.start_daemon` forks daemons from a starter that imported the daemon once (see
# tests/prestart.py); ENGCTL_TEST_SPAWN_DAEMONS=1 starts them the CLI's way.
STARTER = Starter()
FORK_DAEMONS = os.environ.get("ENGCTL_TEST_SPAWN_DAEMONS") != "1"

# The CLI under test writes to pipes: its tables must not take the width of the terminal
# pytest runs in (pytest-xdist's workers even set COLUMNS=80 LINES=24). A test that wants a
# width sets COLUMNS in the environment it passes.
for _var in ("COLUMNS", "LINES"):
    os.environ.pop(_var, None)

# Hypothesis' per-example deadline measures the machine's load when the suite runs in
# parallel, not the code: properties are bounded by their example counts instead.
settings.register_profile("engctl", deadline=None)
settings.load_profile("engctl")


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll `pred` until it returns something truthy; fail the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {pred}")
        time.sleep(interval)



def stays(pred: Callable[[], Any], seconds: float = 1.0) -> None:
    """Assert `pred()` holds on every poll for `seconds` (a bounded "never happens" check)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pred(), "condition stopped holding"
        time.sleep(0.05)

@contextlib.contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """Hold a lock shared by every test run on this machine (xdist's workers, a suite of
    another checkout) for what cannot be private to a test, such as a fixed TCP port."""
    with open(f"/tmp/engctl-tests-{name}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def default_sigint() -> None:
    """`preexec_fn` of a command run in a terminal: a shell without job control starts
    background jobs with SIGINT ignored, and Python then installs no KeyboardInterrupt
    handler: give the child the default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def matched(child: pexpect.spawn[str]) -> re.Match[str]:
    """The match of the pattern that the child's last `expect` waited for."""
    assert isinstance(child.match, re.Match), child.match
    return child.match


def printed(child: pexpect.spawn[str]) -> str:
    """What the child printed before the match of its last `expect`."""
    assert isinstance(child.before, str), child.before
    return child.before


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, NaN equal to NaN, an int never equal to a float."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same_json(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_json(a[k], b[k]) for k in a)
    return bool(a == b)


def engine_cmd(script: str, *args: str) -> list[str]:
    """argv running one of the test engines with this interpreter."""
    return [PY, str(ENGINES / script), *args]


def _home_processes(
    home: Path, daemon_id: str, forked: list[psutil.Process]
) -> list[psutil.Process]:
    """Every live process that belongs to this test's home: daemons and their engines."""
    found = [p for p in forked if alive(p)]
    for p in psutil.process_iter(["pid"]):
        if p.pid == os.getpid():
            continue
        try:
            env = p.environ()
            cmd = p.cmdline()
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if (
            env.get("ENGCTL_DAEMON_ID") == daemon_id
            or env.get("ENGCTL_HOME") == str(home)
            or str(home) in cmd
        ) and p not in found:
            found.append(p)
    return found


def alive(p: psutil.Process) -> bool:
    """Whether `p` (not another process that got its pid since) runs and is not a zombie."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class Home:
    """A private engctl home: its paths, a CLI runner and a Python client."""

    path: Path
    paths: Paths
    env: dict[str, str]
    # Daemons `start_daemon` forked: /proc shows them with the starter's environment.
    forked: list[psutil.Process] = field(default_factory=list)

    def cli(
        self, *args: str, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `engctl ARGS` in a fresh process against this home."""
        return subprocess.run(
            [PY, "-m", "engctl", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def client(self, **kw: Any) -> Client:
        return Client(self.path, **kw)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return cast("dict[str, Any]", c.status())

    def instances(self, engine: str | None = None) -> list[dict[str, Any]]:
        st = self.status()
        return [i for e in st["engines"] if engine in (None, e["name"]) for i in e["instances"]]

    def instance(self, inst_id: str) -> dict[str, Any]:
        for i in self.instances():
            if i["id"] == inst_id:
                return i
        raise KeyError(inst_id)

    def wait_state(self, inst_id: str, *states: str, timeout: float = 15.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            inst = self.instance(inst_id)
            return inst if inst["state"] in states else None

        return wait_until(check, timeout)  # type: ignore[no-any-return]

    def register(self, name: str, command: list[str], **spec: Any) -> dict[str, Any]:
        with self.client() as c:
            return c.register({name: {"command": command, **spec}})

    def start_daemon(self, *, launch_delay: float = 0.0, **daemon_config: Any) -> Home:
        """Write `[daemon]` settings to this home's config.toml, then start its daemon (with
        `launch_delay`, a forked one whose every launch takes that long more)."""
        if daemon_config:
            import tomli_w

            self.paths.config_file.parent.mkdir(parents=True, exist_ok=True)
            self.paths.config_file.write_text(tomli_w.dumps({"daemon": daemon_config}))
        if FORK_DAEMONS and self.daemon_pid() is None:
            # The runtime folder holds daemon.stderr; the client makes it the same way.
            self.paths.runtime_dir.mkdir(mode=0o700, exist_ok=True)
            args = ["--home", str(self.path)]
            stderr = self.paths.runtime_dir / "daemon.stderr"
            message = STARTER.start(dict(os.environ), stderr, args, launch_delay)
            assert message == "ok", f"cannot start the daemon: {message}"
            pid = self.daemon_pid()
            assert pid is not None
            self.forked.append(psutil.Process(pid))
        with self.client() as c:
            c.connect()
        assert self.daemon_pid() is not None
        return self

    def daemon_pid(self) -> int | None:
        try:
            text = self.paths.daemon_lock.read_text().strip()
        except FileNotFoundError:
            return None
        return int(text) if text.isdigit() and psutil.pid_exists(int(text)) else None


@pytest.fixture(scope="session", autouse=True)
def daemon_starter() -> Iterator[Starter]:
    """The daemon starter of this test process, ended with the session."""
    yield STARTER
    STARTER.close()


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Home]:
    """A short private ENGCTL_HOME (AF_UNIX paths are limited to 108 bytes).

    On teardown every daemon and engine of this home is stopped; a test that leaves a
    process behind fails.
    """
    with private_home() as h:
        monkeypatch.setenv("ENGCTL_HOME", str(h.path))
        yield h


@contextlib.contextmanager
def private_home(prefix: str = "eh") -> Iterator[Home]:
    """A fresh home under /tmp; on exit its processes are stopped (any left fail the test)
    and it is removed. For fixtures of a wider scope than `home`."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    h = Home(path, resolve_paths(path), {**os.environ, "ENGCTL_HOME": str(path)})
    try:
        yield h
    finally:
        leftovers = _stop_everything(h)
        shutil.rmtree(path, ignore_errors=True)
        if leftovers:
            pytest.fail(f"processes left behind: {leftovers}")


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _stop_everything(h: Home) -> list[str]:
    """Stop daemons gracefully, then kill whatever of this home is still alive."""
    pid = h.daemon_pid()
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        # The daemon is init's child (it detaches), so it may linger as a zombie until init
        # reaps it: that counts as gone. One that does not stop is killed below.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not _running(pid), timeout=20, interval=0.01)
    leftovers = []
    for p in _home_processes(h.path, h.paths.daemon_id, h.forked):
        with contextlib.suppress(psutil.Error):
            leftovers.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
            p.kill()
    return leftovers


@pytest.fixture
def daemon(home: Home) -> Iterator[Home]:
    """A daemon running in `home`, started the way the CLI starts it (background, ready fd)."""
    yield home.start_daemon()
