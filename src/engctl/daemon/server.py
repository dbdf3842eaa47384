"""The Unix-socket JSON-RPC server: framing, size limit, peer check, and the wire-error boundary.

Every exception a handler raises becomes a JSON-RPC error here and nowhere else; nothing a
client sends (garbage, a 10 MiB line, half a frame, 20,000 connections, a pipelined flood)
can stop the daemon or starve its other clients.

Imports the shared contract only: it knows handlers, not what they do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engctl import protocol
from engctl.errors import (
    BusyError,
    EngctlError,
    InternalError,
    MethodNotFoundError,
    PermissionDeniedError,
    ProtocolError,
)

log = logging.getLogger("engctl.server")

Handler = Callable[[dict[str, Any], "Connection"], Any]
# Above this much unsent output, a connection's input is no longer read (backpressure: a
# client that does not read its answers gets no new work done for it), and a client that
# then takes none of its output for STALL_SECONDS (or idle_timeout if shorter) is dropped.
# One that lets more than MAX_UNREAD_OUTPUT pile up is dropped at once. The size of one
# answer is not bounded here: a single result is as large as a worker may send (see
# "Limits" in docs/guarantees.md).
WRITE_HIGH_WATER = 256 * 1024
STALL_SECONDS = 5.0
MAX_UNREAD_OUTPUT = 256 * 1024 * 1024
# Fairness: frames handled for one connection in one loop turn, and the time they may take
# (a status of a large fleet costs far more than an exec). The rest waits for the next
# turn, after every other ready connection had its turn.
FRAMES_PER_TURN = 64
SECONDS_PER_TURN = 0.002
# How often idle and stalled connections are looked for (at most; less for short timeouts).
SWEEP_INTERVAL = 1.0
# Warnings a client can cause (refused or dropped connections) are logged at most this often.
LOG_EVERY = 10.0


class ThrottledLog:
    """One log line per `every` seconds for a repeated event, with how many were not logged:
    a flood of refused connections must not become a flood of log lines."""

    def __init__(self, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic):
        self.every = every
        self.clock = clock
        self._next = 0.0
        self._skipped = 0

    def warning(self, message: str, *args: object) -> None:
        now = self.clock()
        if now < self._next:
            self._skipped += 1
            return
        if self._skipped:
            message += f" (and {self._skipped} more like it in the last {self.every:g}s)"
        self._skipped = 0
        self._next = now + self.every
        log.warning(message, *args)


class Outbox:
    """Writes made while one chunk of input is handled leave together when it is done: one
    syscall per destination, in the same loop iteration, rather than one iteration later.

    Writes made elsewhere (timers, other callbacks) are flushed on the next iteration.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[Any] = []  # objects with a _flush() method
        self._depth = 0
        self._scheduled = False

    def mark(self, sink: Any) -> None:
        """`sink` has output waiting; it must not be marked again until it is flushed."""
        self._dirty.append(sink)
        if self._depth == 0 and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def __enter__(self) -> Outbox:
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.flush()

    def _scheduled_flush(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        while self._dirty:
            dirty, self._dirty = self._dirty, []
            for sink in dirty:
                sink._flush()


class Connection(asyncio.Protocol):
    """One client connection: splits lines, calls handlers, answers as each call completes.

    Reading pauses while the client leaves more than WRITE_HIGH_WATER of output unread, and
    after FRAMES_PER_TURN frames in one loop turn (the rest is handled on the next turn).
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._discarding = False
        # Callbacks that undo what this connection holds (stream subscriptions); a
        # connection that holds one is a follower and never idle.
        self.on_close: list[Callable[[], None]] = []
        self.closed = False
        self._out: list[bytes] = []
        self.pending = 0  # calls read and not answered yet
        self.last_active = 0.0  # loop time of the last input or taken output
        self.written = 0  # bytes handed to the transport
        self._sent_seen = 0  # bytes the client had taken at the last sweep
        self._stalled_since: float | None = None
        self._write_paused = False  # the client leaves too much output unread
        self._turn_paused = False  # this turn's budget is spent; more input waits
        self._reading = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        sock = transport.get_extra_info("socket")
        if sock is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                server.refusals.warning("refused connection from pid %d with uid %d", pid, uid)
                self._refuse(PermissionDeniedError("permission denied: other uid"))
                return
        if len(server.connections) >= server.max_connections:
            server.refusals.warning(
                "refused a connection: %d clients connected (max_connections)",
                len(server.connections),
            )
            self._refuse(
                BusyError(
                    f"busy: the daemon serves at most {server.max_connections} connections"
                    " at a time (max_connections in config.toml)"
                )
            )
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.last_active = server.loop.time()
        server.connections.add(self)

    def _refuse(self, exc: EngctlError) -> None:
        assert self.transport is not None
        self.closed = True
        self.transport.write(protocol.error(None, exc))
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for cb in self.on_close:
            try:
                cb()
            except Exception:
                log.exception("close callback failed")
        self.on_close.clear()

    def write(self, data: bytes) -> None:
        """Queue bytes for the client; they leave in one send per loop iteration."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self._out:
            self.server.outbox.mark(self)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        data = b"".join(out)
        self.written += len(data)
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_UNREAD_OUTPUT:
            self.drop(f"more than {MAX_UNREAD_OUTPUT >> 20} MiB of output unread")

    def drop(self, why: str) -> None:
        """Close a client that misbehaves, with a (rate-limited) log line saying why."""
        self.server.drops.warning("dropping a client that does not read its output: %s", why)
        if self.transport is not None:
            self.transport.abort()

    # -- flow control ------------------------------------------------------------------
    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self.last_active = self.server.loop.time()
        self._continue()  # input that arrived before the pause may hold whole frames

    def _update_reading(self) -> None:
        want = not (self._write_paused or self._turn_paused)
        if want == self._reading or self.transport is None or self.transport.is_closing():
            return
        self._reading = want
        if want:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    # -- input -------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_active = self.server.loop.time()
        self._buf += data
        self._continue()

    def _continue(self) -> None:
        """Handle the frames waiting in the buffer, up to this turn's budget."""
        self._turn_paused = False
        if self.closed or self._write_paused:
            self._update_reading()
            return
        with self.server.outbox:
            more = self._receive()
        if more and not self.closed:
            # Budget spent: the rest after every other ready callback of this turn.
            self._turn_paused = True
            self.server.loop.call_soon(self._continue)
        self._update_reading()

    def _receive(self) -> bool:
        """Handle complete lines within the turn's budget; True if more wait."""
        buf = self._buf
        limit = self.server.max_frame
        start = 0
        frames = 0
        until = time.perf_counter() + SECONDS_PER_TURN
        more = False
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if frames and (frames >= FRAMES_PER_TURN or time.perf_counter() > until):
                more = True
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            if self._discarding:
                # The tail of an oversized frame: its error was sent already.
                self._discarding = False
                continue
            if line.strip():
                frames += 1
                self._handle_line(line)
        del buf[:start]
        if not more and len(buf) > limit:
            if not self._discarding:
                self.write(protocol.error(None, ProtocolError(self.server.frame_limit_message())))
            self._discarding = True
            buf.clear()
        return more

    def _handle_line(self, line: bytes) -> None:
        req_id: int | str | None = None
        notification = False
        server = self.server
        try:
            if len(line) > server.max_frame:
                raise ProtocolError(server.frame_limit_message(len(line)))
            # `request.exec` as clients write it: its input is checked, not decoded, and
            # relayed to the worker as the bytes it came in.
            exec_call = protocol.split_exec(line) if line.startswith(protocol.EXEC_HEAD) else None
            if exec_call is not None:
                req_id, params, raw_input = exec_call
                params["input"] = RawJSON(raw_input)
                method = "request.exec"
            else:
                obj = protocol.parse_frame(line)
                req_id = obj.get("id")
                method = obj.get("method")  # type: ignore[assignment]  # checked below
                params = obj.get("params")  # type: ignore[assignment]
                # The common call (int id, a method, params object) is valid as it is;
                # anything else goes through parse_request's checks.
                if not (
                    type(req_id) is int and type(method) is str and method and type(params) is dict
                ):
                    if not isinstance(req_id, int | str) or isinstance(req_id, bool):
                        req_id = None
                    req_id, method, params = protocol.parse_request(obj)
                    # JSON-RPC: a valid call without an id is a notification: no reply.
                    notification = "id" not in obj
                if b"\\ud" in line or b"\\uD" in line:
                    # A \ud800-\udfff escape: a lone surrogate would fail later, in an encoder.
                    protocol.check_unicode(obj)
            handler = server.handlers.get(method)
            if handler is None:
                raise MethodNotFoundError(f"unknown method {method!r}")
            outcome = handler(params, self)
        except Exception as exc:
            if notification:
                log.debug("notification failed", exc_info=exc)
            else:
                self._reply_error(req_id, exc)
            return
        if isinstance(outcome, Reply):
            outcome.bind(self, None if notification else req_id)
        elif isinstance(outcome, Awaitable):
            task = asyncio.ensure_future(outcome)
            self.server.tasks.add(task)
            self.pending += 1
            task.add_done_callback(lambda t: self._finish(None if notification else req_id, t))
        elif req_id is not None:
            self._answer(req_id, outcome)

    def _answer(self, req_id: int | str, value: Any) -> None:
        try:
            if type(value) is RawJSON:  # encoded by the handler (`protocol.encode_doc`)
                frame = protocol.raw_result(req_id, value.raw)
            else:
                frame = protocol.result(req_id, value)
        except Exception as exc:  # a result that cannot be encoded is an error, not a hang
            self._reply_error(req_id, exc)
            return
        self.write(frame)

    def _finish(self, req_id: int | str | None, task: asyncio.Future[Any]) -> None:
        """Answer a call that completed; `req_id` None means nobody waits (notification)."""
        self.server.tasks.discard(task)
        self.pending -= 1
        if req_id is None:
            if not task.cancelled() and task.exception() is not None:
                log.debug("notification failed", exc_info=task.exception())
            return
        if task.cancelled():
            self._reply_error(req_id, InternalError("request cancelled: daemon shutting down"))
            return
        exc = task.exception()
        if exc is not None:
            self._reply_error(req_id, exc)
        else:
            self._answer(req_id, task.result())

    def reply_error(self, req_id: int | str | None, exc: BaseException) -> None:
        """Answer `req_id` with the wire form of `exc` (the one place exceptions become errors)."""
        self._reply_error(req_id, exc)

    def _reply_error(self, req_id: int | str | None, exc: BaseException) -> None:
        if isinstance(exc, EngctlError):
            err = exc
        else:
            # Parameters are checked by raising InvalidParamsError (or another EngctlError):
            # anything else from a handler is a bug of the daemon.
            log.error("internal error", exc_info=exc)
            err = InternalError(
                f"internal error: {type(exc).__name__}: {exc} (see {self.server.log_path})"
            )
        self.write(protocol.error(req_id, err))


class RawJSON:
    """Bytes that are already one valid JSON value, to be spliced into a frame as they are."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        self.raw = raw


class Reply:
    """A result that a callback delivers later: the hot path's alternative to a Future (no
    task, no extra loop hop). A handler returns one and completes it once."""

    __slots__ = ("_conn", "_early", "_id", "done")

    def __init__(self) -> None:
        self._conn: Connection | None = None
        self._id: int | str | None = None
        self._early: tuple[bool, Any] | None = None
        self.done = False

    def bind(self, conn: Connection, req_id: int | str | None) -> None:
        """Called by the server after the handler returned: where the answer goes."""
        self._conn, self._id = conn, req_id
        conn.pending += 1
        if self._early is not None:
            ok, value = self._early
            self._early = None
            self._deliver(ok, value)

    def set_result(self, value: Any) -> None:
        self._complete(True, value)

    def set_exception(self, exc: BaseException) -> None:
        self._complete(False, exc)

    def set_raw_result(self, raw: bytes) -> None:
        """Complete with a result that is already valid, compact JSON (no encoding pass)."""
        conn = self._conn
        if conn is None or self.done:
            self._complete(True, RawJSON(raw))
            return
        # Bound and not done, as for nearly every request: _complete and _deliver inlined.
        self.done = True
        conn.pending -= 1
        if self._id is not None:
            conn.write(protocol.RESULT_FRAME % (protocol.encode_value(self._id), raw))

    def _complete(self, ok: bool, value: Any) -> None:
        if self.done:
            return
        self.done = True
        if self._conn is None:
            self._early = (ok, value)  # completed inside the handler, before bind()
        else:
            self._deliver(ok, value)

    def _deliver(self, ok: bool, value: Any) -> None:
        conn = self._conn
        if conn is None:
            return
        conn.pending -= 1
        if self._id is None:
            return  # a notification: nobody waits
        if ok and isinstance(value, RawJSON):
            conn.write(protocol.raw_result(self._id, value.raw))
        elif ok:
            conn._answer(self._id, value)
        else:
            conn.reply_error(self._id, value)


class Server:
    """Listens on the socket (0600, in a 0700 folder) and routes calls to `handlers`."""

    def __init__(
        self,
        path: Path,
        handlers: dict[str, Handler],
        max_frame: int,
        log_path: Path,
        outbox: Outbox,
        *,
        max_connections: int = 1024,
        idle_timeout: float = 300.0,
    ) -> None:
        self.path = path
        self.handlers = handlers
        self.max_frame = max_frame
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.log_path = log_path
        self.connections: set[Connection] = set()
        self.outbox = outbox
        self.tasks: set[asyncio.Future[Any]] = set()
        self.refusals = ThrottledLog()
        self.drops = ThrottledLog()
        self._server: asyncio.AbstractServer | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop = asyncio.get_running_loop()

    def frame_limit_message(self, size: int | None = None) -> str:
        what = f"frame of {size} bytes exceeds" if size is not None else "frame exceeds"
        return (
            f"{what} the limit of {self.max_frame} bytes (max_frame_bytes in config.toml); skipped"
        )

    async def start(self) -> None:
        loop = self.loop
        # The daemon lock is held: a socket file left here belongs to a dead daemon.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await loop.create_unix_server(lambda: Connection(self), str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        self._sweeper = loop.call_later(self._sweep_interval(), self._sweep)

    def _sweep_interval(self) -> float:
        return min(SWEEP_INTERVAL, self.idle_timeout / 4)

    def _sweep(self) -> None:
        """Close idle connections and drop clients that stopped reading their output."""
        now = self.loop.time()
        self._sweeper = self.loop.call_later(self._sweep_interval(), self._sweep)
        for conn in list(self.connections):
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            unread = transport.get_write_buffer_size()
            sent = conn.written - unread
            took = sent != conn._sent_seen
            conn._sent_seen = sent
            if took:
                conn.last_active = now
            if took or unread <= WRITE_HIGH_WATER:
                conn._stalled_since = None
            elif conn._stalled_since is None:
                conn._stalled_since = now
                continue
            else:
                stalled = now - conn._stalled_since
                if stalled >= min(STALL_SECONDS, self.idle_timeout):
                    conn.drop(f"{unread} bytes unread, none taken for {stalled:.1f}s")
                continue
            if (
                not conn.pending
                and not conn.on_close
                and now - conn.last_active >= self.idle_timeout
            ):
                # Neither a call in flight nor a stream followed: nobody is waiting.
                log.debug("closing a connection idle for %.0fs", now - conn.last_active)
                if unread:
                    transport.abort()  # close() would wait for a reader that never comes
                else:
                    transport.close()

    async def close(self) -> None:
        """Stop accepting, close client connections, cancel in-flight handlers."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn._flush()  # last answers (e.g. "daemon shutting down") before the close
            if conn.transport is not None:
                conn.transport.close()
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# File descriptors never given to client connections: engines' pipes and logs, the
# databases. The connection cap is at most half the soft fd limit.
def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit cannot be the soft one (the kernel caps it at fs.nr_open).
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft if soft != resource.RLIM_INFINITY else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as exc:
        log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
        return soft
    return target


def connection_cap(max_connections: int, fd_limit: int) -> int:
    """The connections the daemon accepts: `max_connections`, keeping half the fds in reserve
    for spawning engines (so a flood of clients can never make a restart fail)."""
    cap = max(1, min(max_connections, fd_limit // 2))
    if cap < max_connections:
        log.warning(
            "max_connections %d lowered to %d: the open-file limit is %d and half of it is"
            " kept for engines (raise the hard limit, e.g. LimitNOFILE= in systemd)",
            max_connections,
            cap,
            fd_limit,
        )
    return cap
