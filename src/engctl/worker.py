"""Helper for writing a Python worker engine: `serve(handler)` speaks the worker protocol.

The protocol (docs/protocol.md): JSON-RPC 2.0 lines on stdin/stdout; `execute` carries
`params.input`, `ping` answers anything; the optional `ready` notification ends warm-up.
stdout belongs to the protocol, so the handler's prints are sent to stderr (the engine's log).
Runs inside engines: imports the stdlib, `engctl.finite` (stdlib only) and nothing else of
engctl, and orjson (msgspec for large requests) when the engine's Python has them (engctl
depends on both; an engine may run another Python).
"""

from __future__ import annotations

import gc
import json
import re
import sys
import time

from engctl.finite import nonfinite_float_in

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: typing costs a worker's start 3 ms
if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from typing import IO, Any

    Handler = Callable[[Any], Any] | Callable[[Any], Awaitable[Any]]

try:  # what the engine's Python has: orjson reads and writes JSON 2-20× faster (its import
    # is 14 ms of a worker's start, but `json` would cost each small request 5-6 µs more)
    import orjson
except ImportError:  # pragma: no cover - engctl installs it; an engine's Python may not
    orjson = None  # type: ignore[assignment]

HANDLER_ERROR = -32000
# The code flag of a function defined with `async def` (inspect.CO_COROUTINE).
CO_COROUTINE = 0x80


def _response(req_id: Any, outcome: Any, error: BaseException | None) -> bytes:
    if error is None:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "result": outcome}
    else:
        msg = {
            "jsonrpc": "2.0",
            "id": req_id,
            "error": {"code": HANDLER_ERROR, "message": f"{type(error).__name__}: {error}"},
        }
    return _dumps(msg) + b"\n"


def _dumps(msg: dict[str, Any]) -> bytes:
    """Compact JSON of a response: orjson's bytes where they mean what `json` would write."""
    if orjson is not None:
        # Subclasses, datetimes and dataclasses pass through to no `default`: they raise, and
        # `json` encodes or refuses them as it always did, as it does NaN (orjson: null).
        strict = (
            orjson.OPT_PASSTHROUGH_SUBCLASS
            | orjson.OPT_PASSTHROUGH_DATETIME
            | orjson.OPT_PASSTHROUGH_DATACLASS
        )
        try:
            out: bytes = orjson.dumps(msg, option=strict)
        except TypeError:
            pass
        else:
            if _find_null(out) is None or not nonfinite_float_in(msg):
                return out
    return json.dumps(msg, separators=(",", ":")).encode()


# A `null` in orjson's bytes may be a NaN or an infinity (`json` writes those as such), or a None
# (`nonfinite_float_in` tells). Found by a compiled pattern: 0.04 ms at 115 KB where
# `b"null" in out` takes 0.07 (`re` comes with json).
_find_null = re.compile(b"null").search

# orjson reads an integer beyond 64 bits as a float, `json` exactly: a line with a run of 19
# digits is read by `json` (digits map to "9", all else to " ").
_DIGIT_RUNS = bytes(57 if 48 <= b <= 57 else 32 for b in range(256))
# From this size on a request is read by msgspec when the engine's Python has it: its integers
# come out exact, so the scan for runs of digits (as long as orjson's own read) is not needed.
LARGE_LINE = 64 * 1024
# msgspec's decoder once the first large line asked for it (its import costs 25 ms: not at the
# start of every worker); None where it is not installed.
_large_decode: Callable[[bytes], Any] | None = None
_large_tried = False


def _loads(line: bytes) -> Any:
    """`json.loads(line)`: by orjson or msgspec where they read the same value."""
    if len(line) >= LARGE_LINE:
        decode = _large_decode if _large_tried else _load_msgspec()
        if decode is not None:
            try:
                return decode(line)
            except (ValueError, RecursionError):  # msgspec.DecodeError is a ValueError
                return json.loads(line)  # json's own error, or what only json reads (NaN)
    if orjson is not None and b"9" * 19 not in line.translate(_DIGIT_RUNS):
        try:
            return orjson.loads(line)
        except orjson.JSONDecodeError:
            pass  # json's own error, or what only json reads (NaN, lone surrogates)
    return json.loads(line)


def _load_msgspec() -> Callable[[bytes], Any] | None:
    """msgspec's decoder, imported on the first large request (None where it is missing)."""
    global _large_decode, _large_tried
    _large_tried = True
    try:
        import msgspec
    except ImportError:  # pragma: no cover - engctl installs it; an engine's Python may not
        return None
    _large_decode = msgspec.json.Decoder().decode
    return _large_decode


def _bad(req_id: Any, code: int, message: str) -> bytes:
    msg = {"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}}
    return (json.dumps(msg) + "\n").encode()


def _decode(line: bytes) -> tuple[Any, str, Any] | bytes:
    """(id, method, input) of a request, or the error frame to answer with."""
    try:
        msg = _loads(line)
    except ValueError as exc:
        return _bad(None, -32700, f"parse error: {exc}")
    if not isinstance(msg, dict) or not isinstance(msg.get("method"), str):
        return _bad(None, -32600, "invalid request")
    params = msg.get("params") or {}
    return msg.get("id"), msg["method"], params.get("input") if isinstance(params, dict) else None


def serve(handler: Handler, *, ready: bool = True, stdin: IO[bytes] | None = None) -> None:
    """Answer requests until stdin closes. Exceptions in `handler` become JSON-RPC errors."""
    inp = stdin or sys.stdin.buffer
    out = sys.stdout.buffer
    # Anything the handler prints must not corrupt the protocol stream.
    sys.stdout = sys.stderr
    if ready:
        out.write(b'{"jsonrpc":"2.0","method":"ready"}\n')
        out.flush()
    # What the engine loaded before serving lives as long as it does: out of the collector's
    # sight, a full collection walks only what requests left (with a large request's thousands
    # of objects, walking the whole heap again and again was a quarter of the worker's time).
    gc.freeze()
    if _is_coroutine_function(handler):
        # asyncio only for an async handler: its import is 40 of the 55 ms (and 5 MiB, with
        # ssl) that a synchronous worker would otherwise spend before it is ready.
        import asyncio

        asyncio.run(_serve_async(handler, inp, out))
        return
    _serve_sync(handler, inp, out)


def _is_coroutine_function(handler: Any) -> bool:
    """What `inspect.iscoroutinefunction` answers (a function, method or partial of one
    defined with `async def`), without importing inspect."""
    if not hasattr(handler, "__code__") and not hasattr(handler, "__func__"):
        import functools  # a partial, maybe: only then

        while isinstance(handler, functools.partial):
            handler = handler.func
    code = getattr(getattr(handler, "__func__", handler), "__code__", None)
    return code is not None and bool(code.co_flags & CO_COROUTINE)


def _print_exc() -> None:
    import traceback  # only when a handler fails

    traceback.print_exc(file=sys.stderr)


# The most one read takes in. Reads go into one buffer kept for all of them: a bytes object of
# this size per read is above glibc's mmap threshold (128 KiB), so every read, however few
# bytes it returns, would map, fault in and unmap a block: 15-20 µs a request.
READ_BYTES = 256 * 1024


def _serve_sync(handler: Callable[[Any], Any], inp: IO[bytes], out: IO[bytes]) -> None:
    # Requests that arrive together are answered with one write (one wake-up of the daemon),
    # unless a handler is slow: then each answer leaves as soon as it is ready.
    readinto1 = getattr(inp, "readinto1", None)  # what is available now, at most one read(2)
    if readinto1 is None:  # a stream of lines only: one request per readline
        while line := inp.readline():
            if line.strip():
                out.write(_answer(handler, line))
                out.flush()
        return
    scratch = bytearray(READ_BYTES)
    view = memoryview(scratch)
    # The start of a request whose newline has not come yet. Each read is searched for
    # newlines once, from where the last search ended: a 115 KB request over two or three reads
    # was joined to the rest and split again at each (a sixth of the worker's time).
    partial = bytearray()
    while True:
        end = readinto1(scratch)
        if not end:
            if partial.strip():  # a last request without its newline
                out.write(_answer(handler, bytes(partial)))
                out.flush()
            return
        start = 0
        while (nl := scratch.find(b"\n", start, end)) >= 0:
            if partial:
                partial += view[start:nl]
                line = bytes(partial)
                partial.clear()
            else:
                line = bytes(view[start:nl])
            start = nl + 1
            if line.strip():
                started = time.perf_counter()
                out.write(_answer(handler, line))
                if time.perf_counter() - started > 0.001:
                    out.flush()
        if start < end:
            partial += view[start:end]
        out.flush()


def _answer(handler: Callable[[Any], Any], line: bytes) -> bytes:
    """The response frame for one request line (empty for a notification)."""
    decoded = _decode(line)
    if isinstance(decoded, bytes):
        return decoded
    req_id, method, value = decoded
    if method == "ping":
        return _response(req_id, "pong", None)
    if method == "execute":
        try:
            return _response(req_id, handler(value), None)
        except Exception as exc:
            _print_exc()
            return _response(req_id, None, exc)
    if req_id is not None:
        return _bad(req_id, -32601, f"unknown method {method!r}")
    return b""


async def _serve_async(handler: Handler, inp: IO[bytes], out: IO[bytes]) -> None:
    import asyncio
    import contextlib

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def run(req_id: Any, value: Any) -> None:
        try:
            result = await handler(value)
            data = _response(req_id, result, None)
        except Exception as exc:
            _print_exc()
            data = _response(req_id, None, exc)
        out.write(data)
        out.flush()

    while True:
        line = await loop.run_in_executor(None, inp.readline)
        if not line:
            break
        decoded = _decode(line)
        if isinstance(decoded, bytes):
            out.write(decoded)
        else:
            req_id, method, value = decoded
            if method == "ping":
                out.write(_response(req_id, "pong", None))
            elif method == "execute":
                task = asyncio.ensure_future(run(req_id, value))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                continue
            elif req_id is not None:
                out.write(_bad(req_id, -32601, f"unknown method {method!r}"))
        out.flush()
    with contextlib.suppress(Exception):
        await asyncio.gather(*tasks)
