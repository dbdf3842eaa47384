"""Blocking Unix-socket client of the daemon, used by the CLI and by programs (`engctl.Client`).

Starts a daemon on first use when none answers (a lock file makes racing callers start one).
Imports only the shared contract and the stdlib, so the CLI stays fast. One piece past 600
lines: one connection with a typed method per call, and starting a daemon for it.
"""

from __future__ import annotations

# socket.py's C core: the Python wrapper would import selectors, array and more on every
# CLI start, for nothing this client uses.
import _socket
import collections
import os
import time
from collections.abc import Iterable, Iterator, Mapping

from engctl import __version__, protocol, trust
from engctl.errors import (
    DaemonNotRunningError,
    DaemonUnreachableError,
    EngctlError,
    ProtocolError,
    from_wire,
)
from engctl.paths import MAX_SOCKET_PATH, Paths, resolve_paths

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import Any, Unpack

    from engctl.documents import (
        EventDoc,
        ExecOptions,
        ExecResult,
        LeaseDoc,
        LeasesDoc,
        RolloutDoc,
        StatusDoc,
    )

# Results can be larger than the requests the daemon accepts: the largest frame the daemon
# sends (a worker's 64 MiB reply line, a oneshot's 16 MiB output as a JSON string, with the
# result object around it) fits well under this (see "Limits" in docs/guarantees.md).
MAX_RESPONSE_BYTES = 256 * 1024 * 1024
# The most one recv(2) takes in.
RECV_BYTES = 256 * 1024
# A connection unused this long may have been closed by the daemon's idle timeout: it is
# checked (one non-blocking peek) before the next call, and replaced if it was.
IDLE_CHECK_SECONDS = 1.0
# How long a starting daemon may take to say it is ready.
START_TIMEOUT = 15.0


class Client:
    """A connection to the daemon; every public method is one JSON-RPC call."""

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        *,
        autostart: bool = True,
        timeout: float | None = None,
        daemon_args: tuple[str, ...] = (),
    ) -> None:
        self.home = str(home) if home else os.environ.get("ENGCTL_HOME") or None
        self.paths = resolve_paths(self.home)
        self.autostart = autostart
        self.daemon_args = daemon_args  # for a daemon this client starts (--reset-registry)
        self.timeout = timeout
        self._sock: _socket.socket | None = None
        self._buf = bytearray()
        self._pos = 0
        self._scratch: memoryview | None = None
        self._next_id = 1
        self._daemon_info: dict[str, Any] = {}
        self._hello_id: int | None = None
        self._used_at = 0.0

    # -- connection ------------------------------------------------------------------------
    def _connect_once(self) -> _socket.socket:
        path = self.paths.socket_file
        if len(path.encode()) > MAX_SOCKET_PATH:
            raise DaemonUnreachableError(
                f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes: use a shorter"
                " ENGCTL_HOME"
            )
        # Never through a symlink, never in a folder another user controls (engctl.trust).
        trust.check_folders(self.paths.roots(), path.rpartition("/")[0])
        trust.check_path(path, "socket")
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(self.timeout)
        return sock

    def connect(self) -> None:
        """Connect (starting a daemon if allowed and needed) and check the protocol version."""
        if self._sock is not None:
            return
        try:
            sock = self._connect_once()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if not self.autostart:
                raise DaemonNotRunningError(
                    f"no daemon is running for {self.paths.where}"
                    " (start one with `engctl daemon start`)"
                ) from exc
            sock = start_daemon(self.paths, self.home, self._connect_once, self.daemon_args)
        except OSError as exc:
            raise DaemonUnreachableError(
                f"cannot connect to {self.paths.socket_file}: {exc.strerror or exc}"
            ) from exc
        self._sock = sock
        self._buf = bytearray()
        self._pos = 0
        self._used_at = time.monotonic()
        # The hello travels with the first call and is checked when its answer is read:
        # one round trip less for every CLI command.
        self._hello_id = self._send(
            "session.hello",
            {"protocol": protocol.PROTOCOL_VERSION, "client": f"engctl {__version__}"},
        )

    @property
    def daemon_info(self) -> dict[str, Any]:
        """The daemon's answer to the hello (`protocol`, `version`, `pid`); connects if needed."""
        if self._sock is None:
            self.connect()
        while self._hello_id is not None:
            msg = self._read_frame()  # nothing else is outstanding right after connect()
            if msg.get("id") == self._hello_id:
                self._take_hello(msg)
            elif msg.get("id") is None and "error" in msg:
                self.close()  # refused (busy, other uid): the daemon closes the connection
                raise from_wire(msg["error"])
        return self._daemon_info

    def close(self) -> None:
        """Close the connection (a follow stream ends with it)."""
        if self._sock is not None:
            _close_quietly(self._sock)
        self._sock = None
        self._hello_id = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, params: dict[str, Any]) -> int:
        self._ready()
        req_id = self._next_id
        self._next_id += 1
        self._send_raw(protocol.request(req_id, method, params))
        return req_id

    def _ready(self) -> None:
        """Connect, or reconnect if the daemon closed the connection while it was unused."""
        if self._sock is not None and time.monotonic() - self._used_at > IDLE_CHECK_SECONDS:
            self._drop_if_closed()
        if self._sock is None:
            self.connect()

    def _drop_if_closed(self) -> None:
        """Forget a connection the daemon closed while it was unused (idle timeout)."""
        import select

        sock = self._sock
        assert sock is not None
        if self._pos < len(self._buf):
            return  # unread frames: let the caller read them
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            # Readable with nothing to read is the end of the stream.
            if readable and not sock.recv(1, _socket.MSG_PEEK):
                self.close()
        except OSError:
            self.close()

    def _send_raw(self, data: bytes) -> None:
        """Send `data` whole. What the daemon answers meanwhile is read into the buffer: it
        stops reading a client that leaves its answers unread, so a large pipelined send
        that did not read would wait for it forever."""
        sock = self._sock
        assert sock is not None
        self._used_at = time.monotonic()
        if self.timeout is not None:
            # With a timeout, Python waits for the socket to be writable before each send,
            # MSG_DONTWAIT or not: only a non-blocking socket sends what fits and returns.
            sock.setblocking(False)
        try:
            try:
                sent = sock.send(data, _socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            if sent < len(data):
                self._send_reading(memoryview(data)[sent:])
        except OSError as exc:
            self._lost(exc)
        finally:
            if self.timeout is not None and self._sock is sock:
                sock.settimeout(self.timeout)

    def _send_reading(self, rest: memoryview) -> None:
        import select

        sock = self._sock
        assert sock is not None
        try:
            while rest:
                readable, writable, _ = select.select([sock], [sock], [], self.timeout)
                if not readable and not writable:
                    raise DaemonUnreachableError(f"the daemon took no input within {self.timeout}s")
                if readable and not self._recv():
                    return  # closed: what it said before is in the buffer
                if writable:
                    try:
                        sent = sock.send(rest, _socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        sent = 0
                    rest = rest[sent:]
        except OSError as exc:
            self._lost(exc)

    def _recv(self, flags: int = 0) -> int:
        """One recv(2) appended to the read buffer: the bytes read, 0 at EOF. Through a scratch
        buffer kept for all reads: a 256 KiB bytes object per read is above glibc's mmap
        threshold, so each would map, fault in and unmap a block (15 µs a call)."""
        sock = self._sock
        assert sock is not None
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = memoryview(bytearray(RECV_BYTES))
        n = sock.recv_into(scratch, 0, flags)
        self._buf += scratch[:n]
        return n

    def _lost(self, exc: OSError) -> None:
        """A send failed: raise what the daemon said before it closed (busy, other uid),
        else that the connection was lost."""
        sock = self._sock
        assert sock is not None
        try:
            while self._recv(_socket.MSG_DONTWAIT):
                pass
        except OSError:
            pass
        for line in bytes(self._buf[self._pos :]).splitlines():
            try:
                msg = protocol.parse_frame(line, MAX_RESPONSE_BYTES)
            except ProtocolError:
                continue
            if msg.get("id") is None and isinstance(msg.get("error"), dict):
                self.close()
                raise from_wire(msg["error"]) from exc
        self.close()
        raise DaemonUnreachableError(f"lost the connection to the daemon: {exc}") from exc

    def _read(self) -> dict[str, Any]:
        """The next frame from the daemon (the hello's answer is checked and skipped)."""
        while True:
            msg = self._hello_or(self._read_frame())
            if msg is not None:
                return msg

    def _hello_or(self, msg: dict[str, Any]) -> dict[str, Any] | None:
        """`msg`, or None when it is the hello's answer (checked and taken)."""
        if self._hello_id is None or msg.get("id") != self._hello_id:
            return msg
        self._take_hello(msg)
        return None

    def _take_hello(self, msg: dict[str, Any]) -> None:
        self._hello_id = None
        if "error" in msg:
            self.close()
            raise from_wire(msg["error"])
        self._daemon_info = msg.get("result") or {}

    def _read_frame(self) -> dict[str, Any]:
        return protocol.parse_frame(self._read_line(), MAX_RESPONSE_BYTES)

    def _read_line(self) -> bytes:
        buf = self._buf
        while True:
            nl = buf.find(b"\n", self._pos)
            if nl >= 0:
                # One copy (a bytearray slice, then bytes of it, made two of a large frame).
                with memoryview(buf) as view:
                    line = bytes(view[self._pos : nl])
                self._pos = nl + 1
                if self._pos > 65536 and self._pos * 2 > len(buf):
                    del buf[: self._pos]  # compact now and then, not per line
                    self._pos = 0
                return line
            if len(buf) - self._pos > MAX_RESPONSE_BYTES:
                self.close()
                raise ProtocolError(f"daemon response exceeds {MAX_RESPONSE_BYTES} bytes")
            assert self._sock is not None
            try:
                got = self._recv()
            except TimeoutError as exc:
                raise DaemonUnreachableError(
                    f"the daemon did not answer within {self.timeout}s"
                ) from exc
            except OSError as exc:
                self.close()
                raise DaemonUnreachableError(f"lost the connection to the daemon: {exc}") from exc
            if not got:
                self.close()
                raise DaemonUnreachableError("the daemon closed the connection (did it stop?)")
            self._used_at = time.monotonic()

    def call(self, method: str, **params: Any) -> Any:
        """Call `method` with by-name params; return its result or raise its EngctlError."""
        return self._result(self._send(method, params))

    def _result(self, req_id: int) -> Any:
        """The result of call `req_id` (read up to its answer), or its EngctlError."""
        while True:
            msg = self._read()
            if msg.get("id") == req_id:
                break
            if "id" in msg and msg.get("id") is None and "error" in msg:
                raise from_wire(msg["error"])  # a connection-level error (e.g. oversized frame)
        if "error" in msg:
            raise from_wire(msg["error"])
        if "result" not in msg:
            raise ProtocolError(f"response without result: {protocol.preview(str(msg))}")
        return msg["result"]

    def call_raw(self, method: str, **params: Any) -> bytes:
        """Like `call`, but the result as the JSON text the daemon sent (not decoded): what
        a command that prints the result as compact JSON passes straight through."""
        req_id = self._send(method, params)
        prefix = protocol.result_head(req_id)
        while True:
            line = self._read_line()
            if line.startswith(prefix) and line.endswith(b"}"):
                return line[len(prefix) : -1]
            msg = protocol.parse_frame(line, MAX_RESPONSE_BYTES)
            if self._hello_id is not None and msg.get("id") == self._hello_id:
                self._take_hello(msg)
                continue
            if msg.get("id") == req_id or ("id" in msg and msg["id"] is None and "error" in msg):
                if "error" in msg:
                    raise from_wire(msg["error"])
                # Another layout than the daemon's own: encode the decoded result.
                import json

                return json.dumps(msg.get("result"), separators=(",", ":")).encode()

    def stream(self, method: str, **params: Any) -> tuple[Any, Iterator[dict[str, Any]]]:
        """Start a streaming call: (its result, an iterator of the notifications that follow)."""
        first = self.call(method, **params)

        def notes() -> Iterator[dict[str, Any]]:
            while True:
                msg = self._read()
                if "method" in msg and "id" not in msg:
                    yield {"method": msg["method"], "params": msg.get("params", {})}

        return first, notes()

    # -- typed calls -----------------------------------------------------------------------
    def status(self, names: list[str] | None = None) -> StatusDoc:
        """`status --json`: every engine with its instances."""
        return self.call("status.get", names=names)  # type: ignore[no-any-return]

    def register(
        self,
        engines: dict[str, dict[str, Any]],
        start: bool = True,
        *,
        recreate: bool = False,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Register or update engines given as `{name: spec table}`. A change that needs new
        processes rolls out (`recreate`: all at once); with `wait`, the answer comes once it
        ended (each updated engine's `rollout` says how: check its `ok`)."""
        return self.call(  # type: ignore[no-any-return]
            "engine.register", engines=engines, start=start, recreate=recreate, wait=wait
        )

    def apply(
        self,
        engines: dict[str, dict[str, Any]],
        prune: bool = False,
        start: bool = True,
        *,
        recreate: bool = False,
        wait: bool = True,
    ) -> dict[str, Any]:
        """Make the registry match `engines` (`prune` removes the others); changes roll out
        as with `register`."""
        return self.call(  # type: ignore[no-any-return]
            "engine.apply",
            engines=engines,
            prune=prune,
            start=start,
            recreate=recreate,
            wait=wait,
        )

    def reload(
        self,
        name: str,
        *,
        max_surge: int | None = None,
        max_unavailable: int | None = None,
        timeout: float | None = None,
        recreate: bool = False,
        wait: bool = True,
        progress: Callable[[EventDoc], None] | None = None,
    ) -> RolloutDoc:
        """Replace the processes of engine `name` (or instance `name#k`) with new ones of its
        wanted spec, one slot after another; `max_surge`/`max_unavailable` default to the
        engine's `rollout` table. With `wait`, return the final rollout object (a failed
        rollout raises RolloutFailedError, the object in `.data`); `progress` is called with
        each of its events (`engine.rollout_started`, `instance.replaced`, …) meanwhile."""
        params: dict[str, Any] = {
            "target": name,
            "max_surge": max_surge,
            "max_unavailable": max_unavailable,
            "timeout": timeout,
            "recreate": recreate,
            "wait": wait,
            "progress": progress is not None,
        }
        req_id = self._send("engine.reload", params)
        while True:
            msg = self._read()
            if msg.get("id") == req_id:
                break
            if progress is not None and msg.get("method") == "event" and "id" not in msg:
                progress(msg.get("params", {}))
            elif "id" in msg and msg.get("id") is None and "error" in msg:
                raise from_wire(msg["error"])
        if "error" in msg:
            raise from_wire(msg["error"])
        return msg["result"]  # type: ignore[no-any-return]

    def unregister(self, names: list[str]) -> dict[str, Any]:
        """Stop and forget engines."""
        return self.call("engine.unregister", names=names)  # type: ignore[no-any-return]

    def start(self, targets: list[str]) -> dict[str, Any]:
        """Start engines or instances (`name` or `name#k`)."""
        return self.call("engine.start", targets=targets)  # type: ignore[no-any-return]

    def stop(
        self, targets: list[str], wait: bool = True, no_dependents: bool = False
    ) -> dict[str, Any]:
        """Stop engines or instances (what depends on a stopped engine first, or refuse with
        `no_dependents`); with `wait`, return once they are stopped."""
        return self.call(  # type: ignore[no-any-return]
            "engine.stop", targets=targets, wait=wait, no_dependents=no_dependents
        )

    def restart(self, targets: list[str]) -> dict[str, Any]:
        """Stop then start engines or instances."""
        return self.call("engine.restart", targets=targets)  # type: ignore[no-any-return]

    def scale(self, name: str, instances: int) -> dict[str, Any]:
        """Set an engine's number of instances."""
        return self.call("engine.scale", name=name, instances=instances)  # type: ignore[no-any-return]

    def prewarm(self, name: str, instances: int, seconds: float | None = None) -> dict[str, Any]:
        """Raise an autoscaled engine's floor to `instances` (for `seconds`, or until the next
        prewarm; 0 ends it)."""
        params: dict[str, Any] = {"name": name, "instances": instances}
        if seconds is not None:
            params["for"] = seconds
        return self.call("engine.prewarm", **params)  # type: ignore[no-any-return]

    def lease_acquire(
        self,
        *,
        ttl: float | None = None,
        holder: str | None = None,
        wait: float | None = None,
        type: str | None = None,
        engine: str | None = None,
        instance: str | None = None,
        require: Iterable[str] = (),
        labels: Mapping[str, str] | Iterable[str] | None = None,
    ) -> LeaseDoc:
        """Lease an idle ready instance that passes the filters (one is started if an engine
        may grow; else wait up to `wait` seconds): `{"lease", "instance", "expires_at", …}`."""
        params = exec_params(type=type, engine=engine, instance=instance, require=require)
        params.update(
            (k, v)
            for k, v in (
                ("ttl", ttl),
                ("holder", holder),
                ("wait", wait),
                ("labels", _label_list(labels)),
            )
            if v is not None
        )
        return self.call("lease.acquire", **params)  # type: ignore[no-any-return]

    def lease_renew(self, lease: str, ttl: float | None = None) -> LeaseDoc:
        """Hold a lease `ttl` more seconds from now (by default its own ttl)."""
        params: dict[str, Any] = {"lease": lease}
        if ttl is not None:
            params["ttl"] = ttl
        return self.call("lease.renew", **params)  # type: ignore[no-any-return]

    def lease_release(self, lease: str) -> dict[str, Any]:
        """Give a leased instance back to the pool."""
        return self.call("lease.release", lease=lease)  # type: ignore[no-any-return]

    def leases(self) -> list[LeaseDoc]:
        """Every lease held."""
        doc: LeasesDoc = self.call("lease.list")
        return doc["leases"]

    def lease(
        self,
        *,
        ttl: float = 30.0,
        holder: str | None = None,
        wait: float | None = None,
        type: str | None = None,
        engine: str | None = None,
        instance: str | None = None,
        require: Iterable[str] = (),
        labels: Mapping[str, str] | Iterable[str] | None = None,
    ) -> HeldLease:
        """A context manager: lease an instance, renew it in the background while the block
        runs (every third of its ttl, on a connection of its own), release it at the end.

        `with client.lease(type="onnx", ttl=30) as held: held.exec({"x": 1})`
        """
        doc = self.lease_acquire(
            ttl=ttl,
            holder=holder,
            wait=wait,
            type=type,
            engine=engine,
            instance=instance,
            require=require,
            labels=labels,
        )
        return HeldLease(self, doc)

    def isolate(self, targets: list[str], reason: str | None = None) -> dict[str, Any]:
        """Take instances out of dispatch by hand (wins over policies until `restore`)."""
        return self.call("instance.isolate", targets=targets, reason=reason)  # type: ignore[no-any-return]

    def drain(self, targets: list[str], reason: str | None = None) -> dict[str, Any]:
        """Let instances finish what they run and give them nothing new, until `restore`."""
        return self.call("instance.drain", targets=targets, reason=reason)  # type: ignore[no-any-return]

    def restore(self, targets: list[str]) -> dict[str, Any]:
        """Undo `isolate`/`drain` and clear policy isolation and downweighting."""
        return self.call("instance.restore", targets=targets)  # type: ignore[no-any-return]

    def policy(self, names: list[str] | None = None) -> dict[str, Any]:
        """The effective failure policy of each engine, with where each value came from."""
        return self.call("policy.show", names=names)  # type: ignore[no-any-return]

    def metrics(self) -> str:
        """The Prometheus text exposition."""
        return self.call("metrics.get")["text"]  # type: ignore[no-any-return]

    def events(
        self, engine: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[EventDoc]:
        """Past events, oldest first."""
        return self.call("events.list", engine=engine, since=since, limit=limit)["events"]  # type: ignore[no-any-return]

    def exec(self, input: Any, **options: Unpack[ExecOptions]) -> ExecResult:
        """Run one request on the best instance; the result object, or the matching error.

        The object is `{"request_id", "engine", "instance", "ok", "result", "latency_ms",
        "attempts"}`; a failure raises RequestFailedError, NoEligibleEngineError,
        RequestTimeoutError or BusyError, with that object (ok false) in `.data`.
        """
        members = protocol.exec_members(exec_params(**options))
        raw = protocol.encode_input(input)
        self._ready()  # the hello takes an id: the frame's is taken after it
        req_id = self._next_id
        self._next_id += 1
        self._send_raw(protocol.EXEC_FRAME % (req_id, members, raw))
        return self._result(req_id)  # type: ignore[no-any-return]

    def exec_many(
        self, inputs: Iterable[Any], *, window: int = 16, **options: Unpack[ExecOptions]
    ) -> Iterator[ExecResult]:
        """Run many requests with up to `window` in flight on this connection.

        Yields one result object per input, in input order, reading `inputs` lazily; a failed
        request yields an object with `"ok": false` and `"error": {"code", "message"}`. So
        does an input that cannot be sent (larger than the daemon's max_frame_bytes, not
        encodable), and an input given as an EngctlError (one the caller could not read).
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        params = exec_params(**options)
        # The filters are the same for every request: encoded once, only the input varies.
        members = protocol.exec_members(params)
        # A frame over the daemon's limit would be answered with an error that names no
        # request: such an input is reported in its place instead of being sent.
        limit = self.daemon_info.get("max_frame_bytes")
        order: collections.deque[int] = collections.deque()
        # Answers that came before their turn, kept as the frames they came in and decoded as
        # they are yielded: decoded at once, a large result waited in memory as thousands of
        # objects (several times its size), which the collector walked again and again.
        done: dict[int, dict[str, Any] | bytes] = {}
        source = iter(inputs)
        exhausted = False
        while True:
            frames = []
            while not exhausted and len(order) < window:
                try:
                    value = next(source)
                except StopIteration:
                    exhausted = True
                    break
                req_id = self._next_id
                self._next_id += 1
                order.append(req_id)
                try:
                    if isinstance(value, EngctlError):
                        raise value
                    frame = protocol.EXEC_FRAME % (req_id, members, protocol.encode_input(value))
                    if isinstance(limit, int) and len(frame) - 1 > limit:
                        raise ProtocolError(
                            f"request of {len(frame) - 1} bytes exceeds the daemon's limit of"
                            f" {limit} bytes (max_frame_bytes in config.toml); not sent"
                        )
                except EngctlError as exc:
                    done[req_id] = {"id": req_id, "error": exc.to_wire()}
                    continue
                frames.append(frame)
            if frames:
                self._send_raw(b"".join(frames))  # one syscall for the whole refill
            if not order:
                return
            while order[0] not in done:
                line = self._read_line()
                answer_id = protocol.response_id(line)
                if answer_id is not None and answer_id != self._hello_id:
                    done[answer_id] = line
                    continue
                msg = self._hello_or(protocol.parse_frame(line, MAX_RESPONSE_BYTES))
                if msg is None:
                    continue
                if isinstance(msg.get("id"), int):
                    done[msg["id"]] = msg
                elif msg.get("id") is None and "error" in msg:
                    # A frame the daemon could not read (e.g. oversized): it names no request,
                    # so none of ours would ever be answered for it. Stop rather than hang.
                    self.close()
                    raise from_wire(msg["error"])
            answer = done.pop(order.popleft())
            if isinstance(answer, bytes):
                answer = protocol.parse_frame(answer, MAX_RESPONSE_BYTES)
            yield result_object(answer)

    def wait_for(self, predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> StatusDoc:
        """Poll `status` until `predicate(status)` is true; return that status."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.status()
            if predicate(st):
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout}s")
            time.sleep(interval)


class HeldLease:
    """A lease held by `Client.lease`: `id`, `instance`, `exec(input, **options)` on it; a
    thread renews it (its own connection) until the block ends, which releases it. A renewal
    that fails (the lease expired, its instance died, the daemon restarted) stops the thread;
    the next `exec` raises the LeaseError."""

    def __init__(self, client: Client, doc: LeaseDoc) -> None:
        import threading

        self.client = client
        self.doc = doc
        self.id = doc["lease"]
        self.instance = doc["instance"]
        self.error: EngctlError | None = None  # why a renewal failed, if one did
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.id}", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        period = max(0.05, float(self.doc["ttl"]) / 3)
        with Client(self.client.home, autostart=False, timeout=self.client.timeout) as renewer:
            while not self._stop.wait(period):
                try:
                    self.doc = renewer.lease_renew(self.id, self.doc["ttl"])
                except EngctlError as exc:
                    self.error = exc
                    return

    def exec(self, input: Any, **options: Unpack[ExecOptions]) -> ExecResult:
        """Run one request on the leased instance."""
        options["lease"] = self.id
        return self.client.exec(input, **options)

    def release(self) -> None:
        """Stop renewing and give the instance back (a lease already ended is left alone)."""
        self._stop.set()
        self._thread.join()
        if self.error is None:
            self.client.lease_release(self.id)

    def __enter__(self) -> HeldLease:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.release()
            return
        # Leaving on an error (maybe the lease's own): that error is the one to see.
        import contextlib

        from engctl.errors import LeaseError

        with contextlib.suppress(LeaseError):
            self.release()


def _label_list(labels: Mapping[str, str] | Iterable[str] | None) -> list[str] | None:
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        return [f"{k}={v}" for k, v in labels.items()]
    return list(labels) or None


# The keys of `documents.ExecOptions` (a typing-only module): a misspelt option is a
# TypeError, as for any keyword argument, not a filter silently left out.
EXEC_OPTIONS = frozenset(
    {
        *("type", "engine", "instance", "require", "prefer", "labels", "key", "strategy"),
        *("timeout", "retries", "explain", "lease", "priority", "caller"),
    }
)


def exec_params(**options: Unpack[ExecOptions]) -> dict[str, Any]:
    """The `request.exec` parameters other than the input, without the unset ones."""
    unknown = sorted(set(options) - EXEC_OPTIONS)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    params: dict[str, Any] = dict(options)
    params["labels"] = _label_list(options.get("labels"))
    params["require"] = list(options.get("require", ())) or None
    params["prefer"] = list(options.get("prefer", ())) or None
    params["retries"] = options.get("retries") or None
    params["explain"] = options.get("explain") or None
    return {k: v for k, v in params.items() if v is not None}


def result_object(msg: dict[str, Any]) -> ExecResult:
    """A `request.exec` response as the documented result object (failures: ok false)."""
    if "result" in msg:
        return msg["result"]  # type: ignore[no-any-return]
    raw_error = msg.get("error")
    error: dict[str, Any] = raw_error if isinstance(raw_error, dict) else {}
    raw_data = error.get("data")
    data: dict[str, Any] = raw_data if isinstance(raw_data, dict) else {}
    out: ExecResult = {
        "request_id": data.get("request_id"),
        "engine": data.get("engine"),
        "instance": data.get("instance"),
        "ok": False,
        "error": {"code": error.get("code"), "message": error.get("message", "unknown error")},
        "latency_ms": data.get("latency_ms"),
        "attempts": data.get("attempts", 0),
    }
    return out


def start_daemon(
    paths: Paths, home: str | None, connect: Any, daemon_args: tuple[str, ...] = ()
) -> _socket.socket:
    """Start a background daemon (one, even when callers race) and return a connection to it."""
    import fcntl

    try:
        runtime = str(paths.runtime_dir)
        for folder, root in paths.roots():  # the runtime folder and the ones that hold it
            if runtime == folder or runtime.startswith(folder + "/"):
                trust.ensure_folder(folder, private=folder == runtime, root=root)
        lock_fd = trust.open_file(str(paths.start_lock), os.O_RDWR | os.O_CREAT)
    except OSError as exc:
        raise DaemonUnreachableError(
            f"cannot start the daemon: {paths.runtime_dir}: {exc.strerror or exc}"
        ) from exc
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        # Another caller may have started it while we waited for the lock.
        try:
            return connect()  # type: ignore[no-any-return]
        except (FileNotFoundError, ConnectionRefusedError):
            _spawn_and_wait(paths, home, daemon_args)
        return connect()  # type: ignore[no-any-return]
    finally:
        os.close(lock_fd)


def _spawn_and_wait(paths: Paths, home: str | None, daemon_args: tuple[str, ...] = ()) -> None:
    import subprocess
    import sys

    read_fd, write_fd = os.pipe()
    err_path = paths.runtime_dir / "daemon.stderr"
    argv = [sys.executable, "-m", "engctl.daemon", "--ready-fd", str(write_fd), "--background"]
    if home:
        argv += ["--home", home]
    argv += daemon_args
    err_fd = trust.open_file(str(err_path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with open(err_fd, "ab") as err:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            pass_fds=(write_fd,),
            start_new_session=True,
        )
    os.close(write_fd)
    # The daemon forks away from this child at once (see engctl.daemon.main).
    proc.wait()
    message = _read_ready(read_fd, START_TIMEOUT)
    if message == "ok":
        return
    if not message:
        tail = _tail(err_path)
        message = f"it exited during start-up{': ' + tail if tail else ''}"
    raise DaemonUnreachableError(f"cannot start the daemon: {message.removeprefix('error: ')}")


def _read_ready(fd: int, timeout: float) -> str:
    import select

    deadline = time.monotonic() + timeout
    data = b""
    try:
        while b"\n" not in data:
            left = deadline - time.monotonic()
            if left <= 0:
                return f"error: no answer within {timeout:g}s"
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    return data.decode(errors="replace").strip()


def _close_quietly(closable: Any) -> None:
    # Not contextlib.suppress: contextlib is kept off the CLI's start-up path.
    try:
        closable.close()
    except OSError:
        return


def _tail(path: Path) -> str:
    from engctl.errors import EngctlError

    try:
        text = trust.read_file(str(path)).decode(errors="replace")
    except (OSError, EngctlError):
        return ""
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""
