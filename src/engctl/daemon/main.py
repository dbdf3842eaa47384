"""Daemon start-up and shutdown: folders, the single-daemon lock, wiring, signals.

Run as `python -m engctl.daemon` (what the CLI spawns) or `engctl daemon run` (foreground).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import logging.handlers
import os
import signal
import sys
from pathlib import Path

from engctl import __version__
from engctl.config import DaemonConfig
from engctl.errors import DaemonUnreachableError, EngctlError
from engctl.models import check_dependencies
from engctl.paths import MAX_SOCKET_PATH, Paths, resolve_paths
from engctl.states import DesiredState

from . import process
from .api import Api
from .enforcer import Enforcer
from .events import EventLog
from .history import HistoryWriter, Retention
from .metrics import HostSample, MetricsServer, Rollups
from .monitor import Monitor
from .registry import Entry, Registry
from .requests import Router
from .server import Outbox, Server
from .supervisor import Sample, Supervisor

log = logging.getLogger("engctl.daemon")


def prepare_folders(paths: Paths) -> None:
    """Create the home's folders; the socket folder is private (0700)."""
    if len(str(paths.socket).encode()) > MAX_SOCKET_PATH:
        raise DaemonUnreachableError(
            f"socket path {paths.socket} is longer than {MAX_SOCKET_PATH} bytes"
            " (AF_UNIX limit): use a shorter ENGCTL_HOME"
        )
    for d in (paths.runtime_dir, paths.state_dir, paths.log_dir):
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise DaemonUnreachableError(f"cannot create {d}: {exc.strerror}") from exc
        if not os.access(d, os.W_OK | os.X_OK):
            raise DaemonUnreachableError(f"folder {d} is not writable")
    os.chmod(paths.runtime_dir, 0o700)


def acquire_daemon_lock(paths: Paths) -> int:
    """Hold an exclusive lock for the daemon's lifetime: at most one daemon per home."""
    fd = os.open(paths.daemon_lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise DaemonUnreachableError(
            f"another daemon already runs for this home (pid {other})"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def setup_logging(paths: Paths, foreground: bool) -> None:
    handler = logging.handlers.RotatingFileHandler(
        paths.daemon_log, maxBytes=5 * 1024 * 1024, backupCount=2
    )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("engctl")
    root.handlers[:] = [handler]
    if foreground:
        root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(logging.INFO)


class Daemon:
    """The running daemon: owns the server, supervisor, monitor and event log."""

    def __init__(self, paths: Paths, config: DaemonConfig, metrics_port: int | None = None) -> None:
        self.paths = paths
        self.config = config
        self.metrics_port = config.metrics_port if metrics_port is None else metrics_port
        self.rollups: Rollups | None = None
        self.stopping = asyncio.Event()
        self._signals = 0
        self.enforcer: Enforcer | None = None

    async def run(self, ready: int | None) -> None:
        paths, config = self.paths, self.config
        loop = asyncio.get_running_loop()
        events = EventLog(paths.events_db, config.events_retention)
        monitor = Monitor(config.sample_interval, loop, self._apply_samples)
        sup = Supervisor(paths, config, events, monitor.set_targets)
        self.sup = sup
        registry = Registry(paths.registry, lambda: [e.to_entry() for e in sup.engines.values()])
        entries = registry.load()
        # Registered engines exist before the first client is answered: a status during
        # start-up lists them, and a registration then cannot save a registry without them.
        for entry in entries:
            sup.add_engine(entry.spec, entry.desired, entry.stopped_instances)
        outbox = Outbox(loop)
        router = Router(sup, config, paths, outbox)
        router.engines_changed()
        enforcer = self.enforcer = Enforcer(sup, router, config, events)
        for entry in entries:
            engine = sup.engines[entry.spec.name]
            for index, saved in entry.overrides.items():
                if index < len(engine.instances):
                    enforcer.apply_saved(engine.instances[index], saved)
        writer = None
        if config.metrics:
            writer = HistoryWriter(
                paths.history_db,
                Retention(
                    config.history_fine_retention,
                    config.history_retention,
                    config.history_max_mb * 1024 * 1024,
                ),
            )
        rollups = self.rollups = Rollups(sup, router, writer)
        api = Api(paths, sup, registry, events, router, enforcer, self.stopping.set, rollups)
        server = Server(
            paths.socket, api.handlers(), config.max_frame_bytes, paths.daemon_log, outbox
        )
        await server.start()
        metrics_server = None
        if self.metrics_port:
            metrics_server = MetricsServer(self.metrics_port, api.metrics_text)
            await metrics_server.start()
            log.info("serving Prometheus metrics on http://127.0.0.1:%d/metrics", self.metrics_port)
        roll_timer = loop.call_later(1.0, self._roll, loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if not process.become_subreaper():
            log.warning("cannot become a child subreaper: orphans of engines go to PID 1")
        loop.add_signal_handler(signal.SIGCHLD, process.reap_children)
        monitor.start()
        log.info("engctl %s daemon pid %d listening on %s", __version__, os.getpid(), paths.socket)
        events.emit("daemon.started", f"engctl {__version__} pid {os.getpid()}")
        if ready is not None:
            _notify_ready(ready, "ok")
        # Processes a killed daemon left are stopped even if this one is asked to stop at once.
        self._sweep = asyncio.ensure_future(process.end_old_generation(paths.daemon_id))
        startup = asyncio.ensure_future(self._start_engines(entries))
        await self.stopping.wait()

        log.info("shutting down")
        events.emit("daemon.stopping", "shutdown requested")
        startup.cancel()
        roll_timer.cancel()
        if self._roll_handle is not None:
            self._roll_handle.cancel()
        enforcer.close()
        router.close()
        if metrics_server is not None:
            await metrics_server.close()
        try:
            await self._sweep
        except Exception:
            log.exception("cannot stop the processes of the previous daemon")
        await server.close()
        await sup.shutdown(config.shutdown_timeout)
        monitor.stop()
        if writer is not None:
            writer.write(rollups.close_all())  # the buckets being filled are kept too
            writer.close()
        events.emit("daemon.stopped", "all engines stopped")
        events.close()
        log.info("stopped")

    async def _start_engines(self, entries: list[Entry]) -> None:
        try:
            found = await asyncio.shield(self._sweep)
        finally:
            self.sup.spawn_allowed.set()
        if found:
            self.sup.events.emit(
                "daemon.replaced_orphans",
                f"stopped {found} processes left by a previous daemon; starting fresh instances"
                " (their stdin/stdout pipes died with it)",
            )
        by_name = {e.spec.name: e for e in entries}
        for name in check_dependencies({n: e.spec for n, e in by_name.items()}):
            engine = self.sup.engines.get(name)
            # Clients may have unregistered or replaced it during the sweep above.
            if engine is not None and engine.desired is DesiredState.RUNNING:
                wanted = [
                    i.index for i in engine.instances if i.index not in engine.stopped_instances
                ]
                try:
                    await self.sup.start_engine(engine, "daemon started", wanted)
                except Exception as exc:
                    # One engine that cannot start must not keep the ones after it down.
                    log.exception("cannot start engine %s", name)
                    self.sup.events.emit("engine.start_failed", f"{exc}", engine=name)

    def _apply_samples(self, samples: dict[str, Sample], host: HostSample | None) -> None:
        for inst in self.sup.all_instances():
            s = samples.get(inst.id)
            if s is not None and s.pid == inst.pid:
                inst.sample = s
        if self.enforcer is not None:
            self.enforcer.samples_taken(samples)
        if self.rollups is not None:
            self.rollups.sampled(host)

    _roll_handle: asyncio.TimerHandle | None = None

    def _roll(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the history buckets that are due (a cheap check, once a second)."""
        self._roll_handle = loop.call_later(1.0, self._roll, loop)
        if self.rollups is not None:
            try:
                self.rollups.due()
            except Exception:
                log.exception("cannot roll up metrics")

    def _on_signal(self, sig: signal.Signals) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: graceful shutdown (send again to kill engines at once)", sig.name)
            self.stopping.set()
        else:
            log.warning("%s again: killing every engine now", sig.name)
            self.sup.kill_all()


def _notify_ready(fd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, (message + "\n").encode())
        os.close(fd)


def run(
    home: str | None = None,
    ready_fd: int | None = None,
    foreground: bool = True,
    metrics_port: int | None = None,
) -> int:
    """Run the daemon until it is asked to stop; returns the process exit code."""
    paths = resolve_paths(home)
    try:
        prepare_folders(paths)
        lock_fd = acquire_daemon_lock(paths)
        config = DaemonConfig.load(paths.config_file)
    except EngctlError as exc:
        if ready_fd is not None:
            _notify_ready(ready_fd, f"error: {exc.message}")
        print(f"engctl daemon: {exc.message}", file=sys.stderr)
        return exc.exit_code
    setup_logging(paths, foreground)
    try:
        asyncio.run(Daemon(paths, config, metrics_port).run(ready_fd))
    except EngctlError as exc:
        log.error("%s", exc.message)
        if ready_fd is not None:
            _notify_ready(ready_fd, f"error: {exc.message}")
        print(f"engctl daemon: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:
        log.exception("daemon crashed")
        if ready_fd is not None:
            _notify_ready(ready_fd, f"error: {type(exc).__name__}: {exc}")
        raise
    finally:
        os.close(lock_fd)
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engctl.daemon")
    parser.add_argument("--home", help="engctl home (default: ENGCTL_HOME or platformdirs)")
    parser.add_argument("--ready-fd", type=int, help="write 'ok' or 'error: …' here when ready")
    parser.add_argument("--background", action="store_true", help="log to the file only")
    parser.add_argument(
        "--metrics-port", type=int, help="serve Prometheus /metrics on 127.0.0.1:PORT (0: off)"
    )
    args = parser.parse_args(argv)
    if args.background and os.fork() > 0:
        # The starter reaps this first process at once; the daemon (the fork) is adopted by
        # init, so a program that started it through engctl.Client keeps no zombie of it.
        os._exit(0)
    if args.home:
        os.environ["ENGCTL_HOME"] = str(Path(args.home).absolute())
    sys.exit(
        run(
            args.home, args.ready_fd, foreground=not args.background, metrics_port=args.metrics_port
        )
    )
