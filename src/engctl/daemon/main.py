"""Daemon start-up and shutdown: folders, the single-daemon lock, wiring, signals.

Run as `python -m engctl.daemon` (what the CLI spawns) or `engctl daemon run` (foreground).

The one module that imports every part, and the only place where they are wired together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import io
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from engctl import __version__, trust
from engctl.config import RESTART_SETTINGS, DaemonConfig, config_table, rules_tables
from engctl.errors import DaemonUnreachableError, EngctlError
from engctl.models import check_dependencies
from engctl.paths import MAX_SOCKET_PATH, Paths, resolve_paths
from engctl.protocol import StrategyName, load_orjson
from engctl.states import DesiredState, EventKind

from . import memory, options, process, proctree
from .alerter import Alerter
from .api import Api
from .dispatch import Dispatcher
from .enforcer import Enforcer
from .engine_calls import EngineCalls
from .events import EventLog
from .fleet import Fleet
from .history import HistoryWriter, Retention
from .hooks import Hooks
from .leases import Leases
from .membership import Membership
from .metrics import Rollups
from .monitor import HostSample, Monitor, Sample
from .registry import Entry, Registry
from .router import Router
from .scaler import Scaler
from .selection import CandidatePool, Capability, default_strategies
from .server import Outbox, Server, connection_cap, raise_fd_limit
from .storage import RotatingLog, WriteHealth
from .supervisor import Supervisor

log = logging.getLogger("engctl.daemon")


def prepare_folders(paths: Paths) -> None:
    """Create the home's folders and check that only we control them (`engctl.trust`); the
    socket folder is private (0700)."""
    if len(str(paths.socket).encode()) > MAX_SOCKET_PATH:
        raise DaemonUnreachableError(
            f"socket path {paths.socket} is longer than {MAX_SOCKET_PATH} bytes"
            " (AF_UNIX limit): use a shorter ENGCTL_HOME"
        )
    for folder, root in paths.roots():
        trust.ensure_folder(folder, private=folder == str(paths.runtime_dir), root=root)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise DaemonUnreachableError(f"folder {folder} is not writable")


def acquire_daemon_lock(paths: Paths) -> int:
    """Hold an exclusive lock for the daemon's lifetime: at most one daemon per home."""
    fd = trust.open_file(str(paths.daemon_lock), os.O_RDWR | os.O_CREAT)
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


class LogFile(RotatingLog):
    """The daemon's own log: never opened through a symlink; a failed write (a full disk) is
    counted in the write health instead of printing a traceback to stderr."""

    health: WriteHealth | None = None
    _failed = False

    def _open(self) -> io.TextIOWrapper:
        fd = trust.open_file(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        return open(fd, "a", encoding=self.encoding or "utf-8", errors=self.errors)

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)
        if not self._failed and self.health is not None:
            self.health.succeeded("daemon.log")

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed = True
        exc = sys.exc_info()[1]
        if self.health is not None and isinstance(exc, OSError):
            self.health.failed("daemon.log", exc, self.baseFilename)


def setup_logging(paths: Paths, foreground: bool) -> LogFile:
    handler = LogFile(paths.daemon_log, max_bytes=5 * 1024 * 1024, backups=2)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # The root logger, not only "engctl": asyncio's own errors (an accept that failed for
    # lack of fds, a callback that raised) and warnings would otherwise go to stderr, which
    # nothing rotates.
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if foreground:
        root.addHandler(logging.StreamHandler(sys.stderr))
    root.setLevel(logging.WARNING)
    logging.getLogger("engctl").setLevel(logging.INFO)
    # Library warnings go to the log, never to a terminal or daemon.stderr.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").handlers[:] = [handler]
    return handler


# The background daemon's stdout and stderr go to `daemon.stderr` (opened by the client that
# starts it). Logging does not write there, but a C library or a crash might: past this size
# the file is rotated (one backup kept).
STDERR_MAX_BYTES = 1024 * 1024


def bound_stderr(path: Path) -> None:
    """Rotate `path` if it is this process's stderr and has grown past STDERR_MAX_BYTES."""
    try:
        st = os.fstat(2)
        if st.st_size <= STDERR_MAX_BYTES:
            return
        try:
            named = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return
        if (named.st_dev, named.st_ino) != (st.st_dev, st.st_ino):
            return  # stderr is somewhere else (a terminal, systemd's journal): not ours
        os.replace(path, path.with_name(path.name + ".1"))
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW, 0o600
        )
    except OSError as exc:
        log.warning("cannot rotate %s: %s", path, exc.strerror or exc)
        return
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


class Daemon:
    """The running daemon: owns the server, supervisor, monitor and event log."""

    def __init__(
        self,
        paths: Paths,
        config: DaemonConfig,
        metrics_port: int | None = None,
        reset_registry: bool = False,
        health: WriteHealth | None = None,
    ) -> None:
        self.paths = paths
        self.config = config
        self.metrics_port = config.metrics_port if metrics_port is None else metrics_port
        self.reset_registry = reset_registry
        self.health = health if health is not None else WriteHealth()
        self.rollups: Rollups | None = None
        self.stopping = asyncio.Event()
        self._signals = 0
        self.enforcer: Enforcer | None = None
        self.scaler: Scaler | None = None
        self.leases: Leases | None = None
        self.alerter: Alerter | None = None
        self.hooks: Hooks | None = None
        self.events: EventLog | None = None
        self.writer: HistoryWriter | None = None

    def _notify(self, kind: EventKind, reason: str, data: dict[str, Any]) -> None:
        """Emit an event from any thread (the storage layer reports through this)."""
        self.loop.call_soon_threadsafe(self._emit, kind, reason, data)

    def _emit(self, kind: EventKind, reason: str, data: dict[str, Any]) -> None:
        if self.events is not None:
            self.events.emit(kind, reason, data=data)

    async def run(self, ready: int | None) -> None:
        paths, config = self.paths, self.config
        loop = self.loop = asyncio.get_running_loop()
        memory.keep_reads_on_the_heap()  # no mmap and munmap per request (see there)
        memory.share_one_malloc_arena()
        memory.freeze_heap()  # the modules' objects; no engine's yet (see there)
        health = self.health
        # The registry first: a daemon that cannot read it refuses to start, changing nothing.
        registry = Registry(
            paths.registry,
            lambda: [e.to_entry(enforcer.overrides(e)) for e in sup.engines.values()],
            health,
        )
        moved = registry.reset() if self.reset_registry else None
        entries = registry.load()
        health.attach(self._notify)
        events = self.events = EventLog(
            paths.events_db, config.events_retention, health, self._notify
        )
        if moved is not None:
            log.warning("--reset-registry: %s moved to %s", paths.registry, moved)
            events.emit(
                EventKind.DAEMON_REGISTRY_RESET,
                f"--reset-registry: {paths.registry.name} moved to {moved.name};"
                " starting with no engines",
                data={"path": str(paths.registry), "moved_to": str(moved)},
            )
        for bad in registry.skipped_json():
            log.warning("registry entry %r skipped: %s", bad["name"], bad["error"])
            events.emit(
                EventKind.REGISTRY_ENTRY_SKIPPED,
                f"cannot read its registry entry ({bad['error']}): not started; the entry is"
                " kept in registry.json",
                engine=bad["name"],
            )
        monitor = self.monitor = Monitor(config.sample_interval, loop, self._apply_samples)
        sup = Supervisor(paths, config, events, self._targets_changed)
        sup.write_health = health
        self.sup = sup
        fleet = self.fleet = Fleet(sup)
        # Registered engines exist before the first client is answered: a status during
        # start-up lists them, and a registration then cannot save a registry without them.
        for entry in entries:
            spec, desired = entry.spec, entry.desired
            fleet.add_engine(
                spec, desired, entry.stopped_instances, entry.registered_at, entry.generation
            )
        outbox = Outbox(loop)
        pool = self.pool = CandidatePool(
            default_strategy=config.default_strategy,
            strategies=default_strategies(weights=config.capability_weights),
        )
        dispatcher = Dispatcher(sup, pool, outbox)
        router = self.router = Router(sup, pool, dispatcher, config)
        membership = Membership(sup, pool, dispatcher, router)
        enforcer = self.enforcer = Enforcer(sup, dispatcher, config, events)
        # Who calls whom. Supervision tells the request layer of every process and state; the
        # failure policies hear of each state first, and of every failed request; their
        # verdicts (eligibility, weight) go to the pool; each attempt's end goes back to the
        # router.
        sup.observer = membership
        membership.policies = enforcer
        router.policies = enforcer
        enforcer.listener = membership
        dispatcher.outcomes = router
        membership.engines_changed()
        for entry in entries:
            engine = sup.engines[entry.spec.name]
            for index, saved in entry.overrides.items():
                if index < len(engine.instances):
                    enforcer.apply_saved(engine.instances[index], saved)
        writer = None
        if config.metrics:
            writer = self.writer = HistoryWriter(
                paths.history_db, Retention.of(config), health=health, on_reset=self._notify
            )
        rollups = self.rollups = Rollups(sup, router, writer)
        # Elastic pools and leases: the autoscaler is told of every request that has to wait
        # (only while an engine autoscales), the leases pin their requests and hear of a
        # leased instance that stops.
        scaler = self.scaler = Scaler(
            sup, fleet, router, events, config, paths.history_db if config.metrics else None
        )
        leases = self.leases = Leases(
            sup,
            pool,
            scaler,
            events,
            config,
            on_standing=membership.standing_changed,
            on_ended=lambda: router.retry_waiting(len(router.queue)),
        )
        router.leases = leases
        membership.leases = leases
        scaler.engines_changed()
        # Alert rules run on the policy tick; hooks hear every event (alerts included).
        alerter = self.alerter = Alerter(sup, router, rollups, events, config)
        enforcer.alerts = alerter
        hooks = self.hooks = Hooks(loop, config)
        events.subscribers.add(hooks.event)
        engine_calls = EngineCalls(sup, fleet, registry, events, membership, enforcer, scaler)
        api = Api(
            paths, sup, engine_calls, registry, events, router, self.stopping.set, rollups, leases
        )
        api.control = self
        api.alerter = alerter
        api.hooks = hooks
        api.monitor = monitor
        server = Server(
            paths.socket,
            api.handlers(),
            config.max_frame_bytes,
            paths.daemon_log,
            outbox,
            max_connections=connection_cap(config.max_connections, raise_fd_limit()),
            idle_timeout=config.idle_timeout,
        )
        metrics_server = None
        if self.metrics_port:
            from .prometheus import MetricsServer  # only with a port: nobody else needs it

            # Before the socket exists: a port in use ends the start-up with nothing left over.
            metrics_server = MetricsServer(self.metrics_port, api.metrics_text)
            try:
                await metrics_server.start()
            except OSError as exc:
                reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
                raise DaemonUnreachableError(
                    f"cannot serve metrics on 127.0.0.1:{self.metrics_port}: {reason}"
                    " (choose another --metrics-port, or metrics_port in config.toml)"
                ) from exc
            log.info("serving Prometheus metrics on http://127.0.0.1:%d/metrics", self.metrics_port)
        await server.start()
        roll_timer = loop.call_later(1.0, self._roll, loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if not process.become_subreaper():
            log.warning("cannot become a child subreaper: orphans of engines go to PID 1")
        loop.add_signal_handler(signal.SIGCHLD, process.reap_children)
        monitor.start()
        log.info("engctl %s daemon pid %d listening on %s", __version__, os.getpid(), paths.socket)
        events.emit(EventKind.DAEMON_STARTED, f"engctl {__version__} pid {os.getpid()}")
        if ready is not None:
            _notify_ready(ready, "ok")
        # Processes a killed daemon left are stopped even if this one is asked to stop at once.
        self._sweep = asyncio.ensure_future(proctree.end_old_generation(paths.daemon_id))
        startup = asyncio.ensure_future(self._start_engines(entries))
        await self.stopping.wait()

        log.info("shutting down")
        # As Envoy drains a listener: take no new request, let those held (in flight or
        # queued) finish within half of shutdown_timeout, then stop the engines within the rest.
        began = loop.time()
        held = len(router.deadlines)
        events.emit(
            EventKind.DAEMON_STOPPING,
            f"shutdown requested: {held} requests to finish first"
            if held
            else "shutdown requested",
            data={"requests": held},
        )
        unfinished = await router.settle(config.shutdown_timeout / 2)
        if unfinished:
            log.warning(
                "%d requests unfinished after %.0fs: they fail", unfinished, loop.time() - began
            )
        startup.cancel()
        roll_timer.cancel()
        if self._roll_handle is not None:
            self._roll_handle.cancel()
        scaler.close()
        leases.close()
        enforcer.close()
        hooks.close()
        router.close()
        if metrics_server is not None:
            await metrics_server.close()
        try:
            await self._sweep
        except Exception:
            log.exception("cannot stop the processes of the previous daemon")
        # Rollouts end while the connections are open: a `reload` waiting for one gets its
        # answer ("stopped: the daemon is shutting down", exit 1), not a closed connection.
        await fleet.end_rollouts(
            "the daemon is shutting down", config.shutdown_timeout - (loop.time() - began)
        )
        if server.tasks:
            await asyncio.wait(set(server.tasks), timeout=1.0)  # their answers, written
        await server.close()
        await fleet.shutdown(max(1.0, config.shutdown_timeout - (loop.time() - began)))
        monitor.stop()
        if writer is not None:
            writer.write(rollups.close_all())  # the buckets being filled are kept too
            writer.close()
        events.emit(EventKind.DAEMON_STOPPED, "all engines stopped")
        events.close()
        log.info("stopped")

    # -- settings ------------------------------------------------------------------------
    def config_info(self) -> dict[str, Any]:
        """`daemon.config`: the settings the daemon runs with, as config.toml's `[daemon]`."""
        running = dataclasses.replace(self.config, metrics_port=self.metrics_port)
        return {
            "config_file": str(self.paths.config_file),
            "settings": config_table(running),
            **rules_tables(running),
            "restart_needed": sorted(self.restart_needed),
        }

    restart_needed: frozenset[str] = frozenset()

    async def reload(self) -> dict[str, Any]:
        """`daemon.reload`: re-read config.toml and apply what can change while running.

        A file with an error changes nothing (SpecError with its line and column).
        """
        new = await asyncio.to_thread(DaemonConfig.load, self.paths.config_file)
        old = self.config
        names = [f.name for f in dataclasses.fields(DaemonConfig)]
        changed = [n for n in names if getattr(new, n) != getattr(old, n)]
        later = [n for n in changed if n in RESTART_SETTINGS]
        applied = [n for n in changed if n not in RESTART_SETTINGS]
        # Settings that need a restart keep their running value until then.
        self.apply_config(dataclasses.replace(new, **{n: getattr(old, n) for n in later}))
        self.restart_needed = frozenset(later)
        reason = "config.toml re-read: " + (
            f"applied {', '.join(applied)}" if applied else "nothing to apply"
        )
        if later:
            reason += f"; {', '.join(later)} take effect after `engctl daemon stop` and a start"
        log.info("%s", reason)
        if self.events is not None:
            self.events.emit(
                EventKind.DAEMON_RELOADED,
                reason,
                data={"applied": applied, "restart_needed": later},
            )
        return {"changed": changed, "applied": applied, "restart_needed": later}

    def apply_config(self, cfg: DaemonConfig) -> None:
        """Make `cfg` the running settings: every part that keeps one is told."""
        old, self.config = self.config, cfg
        self.sup.config = cfg
        self.router.configure(cfg)
        if self.alerter is not None:
            self.alerter.configure(cfg)
        if self.hooks is not None:
            self.hooks.configure(cfg)
        self.pool.default_strategy = cfg.default_strategy
        if cfg.capability_weights != old.capability_weights:
            capability = Capability(cfg.capability_weights)
            self.pool.strategies[StrategyName.CAPABILITY] = capability
        if self.enforcer is not None:
            self.enforcer.config = cfg  # its next look comes policy_interval later
        if self.scaler is not None:
            self.scaler.config = cfg
        if self.leases is not None:
            self.leases.config = cfg
        if self.events is not None:
            self.events.retention = cfg.events_retention
        self.monitor.interval = cfg.sample_interval
        for inst in self.sup.all_records():
            inst.log.max_bytes = cfg.log_max_bytes
            inst.log.backups = cfg.log_backups
        if self.writer is not None:
            self.writer.retention = Retention.of(cfg)

    async def _start_engines(self, entries: list[Entry]) -> None:
        try:
            found = await asyncio.shield(self._sweep)
        finally:
            self.sup.spawn_allowed.set()
        if found:
            self.sup.events.emit(
                EventKind.DAEMON_REPLACED_ORPHANS,
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
                    await self.fleet.start_engine(engine, "daemon started", wanted)
                except Exception as exc:
                    # One engine that cannot start must not keep the ones after it down.
                    log.exception("cannot start engine %s", name)
                    self.sup.events.emit(EventKind.ENGINE_START_FAILED, f"{exc}", engine=name)

    def _targets_changed(self, targets: dict[str, int]) -> None:
        self.monitor.set_targets(targets)  # and once instances have left, their memory goes back
        if self.rollups is not None and self.rollups.forget_gone():
            memory.release_free_memory_soon(self.loop)

    def _apply_samples(
        self, samples: dict[str, Sample], host: HostSample | None, tick: bool
    ) -> None:
        for inst in self.sup.all_records():
            s = samples.get(inst.key)
            # A quiet instance's kept reading is the one it holds already.
            if s is not None and s is not inst.sample and s.pid == inst.pid:
                inst.sample = s
        if not tick:
            return  # a reading a reader asked for (`Monitor.fresh`): figures, not a tick
        if self.enforcer is not None:
            self.enforcer.samples_taken(samples)
        if self.rollups is not None:
            self.rollups.sampled(host)
        if self.scaler is not None:
            self.scaler.host_sampled(host)

    _roll_handle: asyncio.TimerHandle | None = None

    def _roll(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the history buckets that are due (a cheap check, once a second)."""
        self._roll_handle = loop.call_later(1.0, self._roll, loop)
        bound_stderr(self.paths.runtime_dir / "daemon.stderr")
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
            self.router.stop_settling()  # the requests still held fail now
            self.sup.closing = True  # what is killed now is not restarted
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
    reset_registry: bool = False,
) -> int:
    """Run the daemon until it is asked to stop; returns the process exit code."""
    paths = resolve_paths(home)
    lock_fd = None
    health = WriteHealth()
    try:
        prepare_folders(paths)
        lock_fd = acquire_daemon_lock(paths)
        config = DaemonConfig.load(paths.config_file)
        setup_logging(paths, foreground).health = health
    except EngctlError as exc:
        if lock_fd is not None:
            os.close(lock_fd)
        if ready_fd is not None:
            _notify_ready(ready_fd, f"error: {exc.message}")
        print(f"engctl daemon: {exc.message}", file=sys.stderr)
        return exc.exit_code
    if not foreground:
        bound_stderr(paths.runtime_dir / "daemon.stderr")
    try:
        load_orjson()  # writes `status` and history rows; msgspec comes with request-taking engines
        daemon = Daemon(paths, config, metrics_port, reset_registry, health)
        asyncio.run(daemon.run(ready_fd))
    except EngctlError as exc:
        if not foreground:  # in the foreground the line below is the one line on stderr
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
    args = options.parse(sys.argv[1:] if argv is None else argv)
    if args.background and os.fork() > 0:
        # The starter reaps this first process at once; the daemon (the fork) is adopted by
        # init, so a program that started it through engctl.Client keeps no zombie of it.
        os._exit(0)
    if args.home:
        os.environ["ENGCTL_HOME"] = str(Path(args.home).absolute())
    sys.exit(
        run(
            args.home,
            args.ready_fd,
            foreground=not args.background,
            metrics_port=args.metrics_port,
            reset_registry=args.reset_registry,
        )
    )
