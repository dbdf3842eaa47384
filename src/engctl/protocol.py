"""JSON-RPC 2.0 framing, one object per line, shared by the daemon socket and the CLI.

Shared contract between CLI and daemon: stdlib only.
"""

from __future__ import annotations

import json
from enum import StrEnum

from engctl.errors import EngctlError, InvalidParamsError, ParseError, ProtocolError

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

PROTOCOL_VERSION = 1


class StrategyName(StrEnum):
    """The dispatch strategies (`--strategy`), as named on the wire, on the command line and in
    config.toml: the one list of them (the selection layer implements one of each)."""

    ROUND_ROBIN = "round_robin"
    WEIGHTED_ROUND_ROBIN = "weighted_round_robin"
    LEAST_LOADED = "least_loaded"
    WEIGHTED_RANDOM = "weighted_random"
    CAPABILITY = "capability"
    AFFINITY = "affinity"
    CONSISTENT_HASH = "consistent_hash"


# Their names as plain strings (choices of the CLI and of config.toml).
STRATEGIES = tuple(s.value for s in StrategyName)
# Largest frame either side accepts. A larger line is answered with an error and skipped.
MAX_FRAME_BYTES = 1024 * 1024

# -- frame templates: the frames of the hot paths as bytes, %-formatted around values that are
# already JSON (no dict built, no encoder pass). Every hand-built frame is one of these.
# Daemon -> worker: a request (id, input) and a ping (id).
WORKER_EXECUTE = b'{"jsonrpc":"2.0","id":%d,"method":"execute","params":{"input":%s}}\n'
WORKER_PING = b'{"jsonrpc":"2.0","id":%d,"method":"ping"}\n'
# The canonical start of a response with a result, `{"jsonrpc":"2.0","id":N,"result":`: what
# the daemon writes, and what the client's raw reader and the worker-reply parser look for.
RESPONSE_HEAD = b'{"jsonrpc":"2.0","id":'
RESULT_MEMBER = b',"result":'
# Daemon -> client: a response around a result that is already JSON (id, result): the splice.
RESULT_FRAME = RESPONSE_HEAD + b"%s" + RESULT_MEMBER + b"%s}\n"
# Client -> daemon: `request.exec` with its input and the other parameters already encoded
# (input, `exec_members` of the other parameters, id).
EXEC_FRAME = b'{"jsonrpc":"2.0","method":"request.exec","params":{"input":%s%s},"id":%d}\n'
# The `request.exec` result object (docs/json.md), encoded here and nowhere else: request id,
# engine, instance, ok, latency, attempts, then `explain` and `result` when there are any.
_EXEC_RESULT = (
    b'{"request_id":%s,"engine":%s,"instance":%s,"ok":%s,"latency_ms":%.3f,"attempts":%d%s}'
)
# The same object for the hot path, a success with a result: derived from the one above.
_EXEC_OK = _EXEC_RESULT.replace(b'"ok":%s', b'"ok":true').replace(
    b"%d%s}", b"%d" + RESULT_MEMBER + b"%s}"
)

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_encode_str = json.encoder.encode_basestring  # what _encoder.encode does for a str
_decoder = json.JSONDecoder()
_decode = _decoder.decode
# The C scanner under `decode`, without its two whitespace regex passes and method frames.
_scan = _decoder.scan_once  # type: ignore[attr-defined]


def dumps(obj: Any) -> bytes:
    """One frame: compact JSON and a newline."""
    try:
        return (_encoder.encode(obj) + "\n").encode()
    except UnicodeEncodeError as exc:
        raise _not_unicode(exc) from None
    except RecursionError:
        raise _too_deep() from None


def encode_value(value: Any) -> bytes:
    """One JSON value, compact, as bytes (to splice into a frame built around it)."""
    # Ids and inputs are mostly ints and strings: JSONEncoder.encode would build a C encoder
    # for each int (about 1 µs), the same digits as %d.
    kind = type(value)
    if kind is int:
        return b"%d" % value
    try:
        if kind is str:
            return _encode_str(value).encode()
        return _encoder.encode(value).encode()
    except UnicodeEncodeError as exc:
        raise _not_unicode(exc) from None
    except RecursionError:
        raise _too_deep() from None


def _too_deep() -> InvalidParamsError:
    return InvalidParamsError("value nests too deeply to be encoded (arrays or objects)")


def _not_unicode(exc: UnicodeEncodeError) -> InvalidParamsError:
    bad = exc.object[exc.start : exc.end]
    return InvalidParamsError(
        f"strings must be valid Unicode: {ascii(bad)[1:-1]} is a lone surrogate"
        " (a \\ud800-\\udfff escape that is not half of a pair)"
    )


def check_unicode(obj: Any) -> None:
    """Raise InvalidParamsError if a string in `obj` (key or value) holds a lone surrogate,
    which JSON's \\u escapes can express but UTF-8 cannot."""
    try:
        _encoder.encode(obj).encode()
    except UnicodeEncodeError as exc:
        raise _not_unicode(exc) from None
    except RecursionError:
        raise _too_deep() from None


def number(
    name: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: float | None = None,
    positive: bool = False,
) -> Any:
    """`value` checked as a finite number (an int if `integer`), at least `minimum` and above
    zero if `positive`; else InvalidParamsError naming `name`. The one numeric check of
    parameters, for the daemon's and the CLI's edges alike (nan, inf, 1e999, true...)."""
    kind = "an integer" if integer else "a number"
    shown = preview(repr(value), 40)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidParamsError(f"{name} must be {kind}, got {shown}")
    if integer and not isinstance(value, int):
        raise InvalidParamsError(f"{name} must be {kind}, got {shown}")
    if value != value or value in (float("inf"), float("-inf")):
        raise InvalidParamsError(f"{name} must be a finite number, got {shown}")
    if not integer and isinstance(value, int) and not -(2**1023) < value < 2**1023:
        raise InvalidParamsError(f"{name} must be a finite number, got {shown}")  # no float
    if positive and value <= 0:
        raise InvalidParamsError(f"{name} must be positive, got {shown}")
    if minimum is not None and value < minimum:
        raise InvalidParamsError(f"{name} must be {minimum:g} or more, got {shown}")
    return value


def loads(data: bytes) -> Any:
    """`json.loads(data)`, same results and errors, with a fast path for a line of UTF-8 text
    that is one JSON value with nothing around it (what a well-behaved peer sends)."""
    try:
        text = data.decode()
        obj, end = _scan(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return json.loads(data)  # its own error, or a decoding json.loads accepts (UTF-16…)
    if end != len(text):
        return json.loads(data)  # whitespace around, or extra data
    return obj


def raw_result(req_id: int | str | None, raw: bytes) -> bytes:
    """A response frame around `raw`, a result that is already one compact JSON value."""
    return RESULT_FRAME % (encode_value(req_id), raw)


def result_head(req_id: int) -> bytes:
    """How the daemon's response to call `req_id` starts when it carries a result."""
    return RESPONSE_HEAD + b"%d" % req_id + RESULT_MEMBER


def exec_members(params: dict[str, Any]) -> bytes:
    """The members of `params` as they follow `"input":X` in an EXEC_FRAME (b"" for none)."""
    inner = encode_value(params)[1:-1]
    return b"," + inner if inner else b""


def exec_result(
    request_id: str,
    engine: str | None,
    instance: str | None,
    ok: bool,
    latency_ms: float,
    attempts: int,
    *,
    explain: Any = None,
    result: bytes | None = None,
) -> bytes:
    """The `request.exec` result object as compact JSON: `explain` (when not None) encoded,
    `result` (already JSON: a worker's bytes as it wrote them) spliced in unchanged. A failure
    carries it, decoded, as its error's data."""
    if ok and explain is None and result is not None:
        return exec_ok(request_id, engine, instance, latency_ms, attempts, result)
    tail = b""
    if explain is not None:
        tail = b',"explain":' + encode_value(explain)
    if result is not None:
        tail += RESULT_MEMBER + result
    return _EXEC_RESULT % (
        encode_value(request_id),
        encode_value(engine),
        encode_value(instance),
        b"true" if ok else b"false",
        latency_ms,
        attempts,
        tail,
    )


def exec_ok(
    request_id: str,
    engine: str | None,
    instance: str | None,
    latency_ms: float,
    attempts: int,
    result: bytes,
) -> bytes:
    """`exec_result` of a success with its result and no `explain` (every plain request)."""
    return _EXEC_OK % (
        encode_value(request_id),
        encode_value(engine),
        encode_value(instance),
        latency_ms,
        attempts,
        result,
    )


def request(req_id: int | str | None, method: str, params: dict[str, Any] | None = None) -> bytes:
    """Encode a call (or, with `req_id` None, a notification)."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        msg["params"] = params
    if req_id is not None:
        msg["id"] = req_id
    return dumps(msg)


def result(req_id: int | str | None, value: Any) -> bytes:
    """Encode a successful response."""
    return dumps({"jsonrpc": "2.0", "id": req_id, "result": value})


def error(req_id: int | str | None, exc: EngctlError) -> bytes:
    """Encode an error response from an engctl exception."""
    return dumps({"jsonrpc": "2.0", "id": req_id, "error": exc.to_wire()})


def notification(method: str, params: Mapping[str, Any]) -> bytes:
    """Encode a server-to-client notification (streams such as `events -f`)."""
    return dumps({"jsonrpc": "2.0", "method": method, "params": params})


def parse_frame(line: bytes | str, limit: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Decode one frame into a JSON object, or raise ParseError/ProtocolError."""
    if len(line) > limit:
        raise ProtocolError(f"frame of {len(line)} bytes exceeds the limit of {limit}")
    try:
        text = line.decode() if isinstance(line, bytes) else line
        try:
            obj, end = _scan(text, 0)
        except (ValueError, StopIteration, RecursionError):
            end = -1
        if end != len(text):
            obj = _decode(text)  # whitespace around, extra data, or the error to report
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # [[[… nests too deep
        raise ParseError(f"frame is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"frame must be a JSON object, got {type(obj).__name__}")
    if obj.get("jsonrpc") != "2.0":
        raise ProtocolError('frame lacks "jsonrpc": "2.0"')
    return obj


def parse_request(obj: dict[str, Any]) -> tuple[int | str | None, str, dict[str, Any]]:
    """Validate a decoded call: (id, method, params). Params must be an object if present."""
    req_id = obj.get("id")
    if "id" in obj and req_id is None:
        # JSON-RPC 2.0 discourages a null id: answers with id null are for requests whose id
        # could not be read, so the caller could not tell its answer from such an error.
        raise ProtocolError(
            "id must be a string or an integer (null is refused); omit it for a notification"
        )
    if req_id is not None and (isinstance(req_id, bool) or not isinstance(req_id, int | str)):
        raise ProtocolError("id must be a string, an integer or absent")
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise ProtocolError("method must be a non-empty string")
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise ProtocolError("params must be an object (by-name parameters)")
    return req_id, method, params


def preview(data: bytes | str, limit: int = 120) -> str:
    """A short printable excerpt of offending bytes, for error messages and logs."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    return text[:limit] + ("…" if len(text) > limit else "")
