"""The Unix-socket JSON-RPC server: framing, size limit, peer check, and the wire-error boundary.

Every exception a handler raises becomes a JSON-RPC error here and nowhere else; nothing a
client sends (garbage, a 10 MiB line, half a frame) can stop the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from engctl import protocol
from engctl.errors import (
    EngctlError,
    InternalError,
    InvalidParamsError,
    MethodNotFoundError,
    ProtocolError,
)

log = logging.getLogger("engctl.server")

Handler = Callable[[dict[str, Any], "Connection"], Any]
# A follower that stops reading is dropped once this much output waits for it.
MAX_WRITE_BUFFER = 8 * 1024 * 1024


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
    """One client connection: splits lines, calls handlers, answers as each call completes."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._discarding = False
        self.on_close: list[Callable[[], None]] = []
        self.closed = False
        self._out: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                log.warning("refused connection from pid %d with uid %d", pid, uid)
                transport.write(protocol.error(None, ProtocolError("permission denied: other uid")))
                transport.close()
                return
        self.server.connections.add(self)

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
        if not out or self.transport is None or self.transport.is_closing():
            return
        self.transport.write(b"".join(out))
        if self.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("dropping a client that does not read its output")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        with self.server.outbox:
            self._receive(data)

    def _receive(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        limit = self.server.max_frame
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            if self._discarding:
                # The tail of an oversized frame: its error was sent already.
                self._discarding = False
                continue
            if line.strip():
                self._handle_line(line)
        del buf[:start]
        if len(buf) > limit:
            if not self._discarding:
                self.write(
                    protocol.error(
                        None,
                        ProtocolError(f"frame exceeds the limit of {limit} bytes; skipped"),
                    )
                )
            self._discarding = True
            buf.clear()

    def _handle_line(self, line: bytes) -> None:
        req_id: int | str | None = None
        notification = False
        server = self.server
        try:
            if len(line) > server.max_frame:
                raise ProtocolError(f"frame exceeds the limit of {server.max_frame} bytes")
            obj = protocol.parse_frame(line)
            req_id = obj.get("id")
            method = obj.get("method")
            params = obj.get("params")
            # The common call (int id, a method, params object) is valid as it is; anything
            # else goes through parse_request's checks.
            if not (
                type(req_id) is int and type(method) is str and method and type(params) is dict
            ):
                if not isinstance(req_id, int | str):
                    req_id = None
                req_id, method, params = protocol.parse_request(obj)
            # JSON-RPC: a valid call without an id is a notification and gets no reply.
            notification = req_id is None and "id" not in obj
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
            task.add_done_callback(lambda t: self._finish(None if notification else req_id, t))
        elif req_id is not None:
            self.write(protocol.result(req_id, outcome))

    def _finish(self, req_id: int | str | None, task: asyncio.Future[Any]) -> None:
        """Answer a call that completed; `req_id` None means nobody waits (notification)."""
        self.server.tasks.discard(task)
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
        elif req_id is not None:
            self.write(protocol.result(req_id, task.result()))

    def reply_error(self, req_id: int | str | None, exc: BaseException) -> None:
        """Answer `req_id` with the wire form of `exc` (the one place exceptions become errors)."""
        self._reply_error(req_id, exc)

    def _reply_error(self, req_id: int | str | None, exc: BaseException) -> None:
        if isinstance(exc, EngctlError):
            err = exc
        elif isinstance(exc, KeyError | TypeError | ValueError) and not isinstance(
            exc, UnicodeError
        ):
            err = InvalidParamsError(f"invalid params: {exc}")
            log.debug("invalid params", exc_info=exc)
        else:
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
        if self._id is not None:
            conn.write(
                b'{"jsonrpc":"2.0","id":%s,"result":%s}\n' % (protocol.encode_value(self._id), raw)
            )

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
        if conn is None or self._id is None:
            return  # a notification: nobody waits
        if ok and isinstance(value, RawJSON):
            conn.write(
                b'{"jsonrpc":"2.0","id":%s,"result":%s}\n'
                % (protocol.encode_value(self._id), value.raw)
            )
        elif ok:
            conn.write(protocol.result(self._id, value))
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
    ) -> None:
        self.path = path
        self.handlers = handlers
        self.max_frame = max_frame
        self.log_path = log_path
        self.connections: set[Connection] = set()
        self.outbox = outbox
        self.tasks: set[asyncio.Future[Any]] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # The daemon lock is held: a socket file left here belongs to a dead daemon.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old_umask = os.umask(0o177)
        try:
            self._server = await loop.create_unix_server(lambda: Connection(self), str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop accepting, close client connections, cancel in-flight handlers."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn._flush()  # last answers (e.g. "daemon shutting down") before the close
            if conn.transport is not None:
                conn.transport.close()
        for task in list(self.tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
