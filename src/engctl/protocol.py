"""JSON-RPC 2.0 framing, one object per line, shared by the daemon socket and the CLI.

Shared contract between CLI and daemon: the stdlib; orjson, which encodes inputs and the
daemon's documents (a client loads it when it sends its first large input: `encode_input`; the
daemon at start: `encode_doc`); msgspec, which reads and checks frames (the daemon loads it
with its first engine that takes requests, a client when it reads its first large frame).
"""

from __future__ import annotations

import functools
import json
import re
import sys
from enum import StrEnum

from engctl.errors import EngctlError, InvalidParamsError, ParseError, ProtocolError

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
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
# Client -> daemon: `request.exec` with the other parameters and its input already encoded
# (id, `exec_members` of the other parameters, input). The input comes last, so that the
# daemon finds where it starts by reading the few bytes before it, and relays it as it is
# (`split_exec`) instead of decoding and encoding it again.
EXEC_HEAD = b'{"jsonrpc":"2.0","method":"request.exec","id":'
EXEC_FRAME = EXEC_HEAD + b'%d,"params":{%s"input":%s}}\n'
_PARAMS_MEMBER = b',"params":{'
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
# The C scanner under `decode`: (value, end) from an offset (the members before an input).
_scan = _decoder.scan_once  # type: ignore[attr-defined]
# Most of the bytes before an input `split_exec` reads to find it (the other parameters).
_EXEC_MEMBERS_MAX = 4096
# orjson's import loads dataclasses, uuid, datetime and inspect: 5-10 ms, more than it saves a
# command that sends and reads frames of ordinary size. A client loads it once it has encoded
# an input this large (a program that sends one sends more); until then `json` does the work.
# The same for msgspec's import (25 ms), which reads frames: once one this large comes in.
ORJSON_AFTER_BYTES = FAST_JSON_AFTER_BYTES = 64 * 1024


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
    """`json.loads(data)`, same results and errors: by msgspec (about twice as fast, exact
    integers of any size) once loaded, or for a frame of FAST_JSON_AFTER_BYTES or more; by
    `json` for what msgspec refuses (NaN and Infinity, 1e400, lone surrogates, a BOM, UTF-16,
    nesting past 1,000, every error), which `json` reads or refuses with its own message."""
    decode = _msgspec_decode
    if decode is None and len(data) >= FAST_JSON_AFTER_BYTES:
        decode = load_msgspec()[0]
    if decode is not None:
        try:
            return decode(data)
        except (ValueError, RecursionError):  # msgspec.DecodeError is a ValueError
            pass
    return json.loads(data)


def valid_json(data: bytes) -> bool:
    """Whether `data` is one JSON value that `json` reads alike: the check before a value is
    relayed as the bytes it came in. False also for some that only `json` reads (NaN, 1e400,
    lone surrogates, nesting past 1,000): such a value takes the decoding path instead."""
    skip = _msgspec_skip or load_msgspec()[1]
    try:
        skip(data)  # the syntax, without building the value (5x orjson.loads at 115 KB)
    except (ValueError, RecursionError):  # msgspec.DecodeError is a ValueError
        return False
    # The skip does not look inside strings for UTF-8: checked here (ASCII at once).
    if not data.isascii():
        try:
            data.decode()
        except UnicodeDecodeError:
            return False
    return True


# msgspec, once loaded: its decoder (`loads`) and its skip into Raw (`valid_json`).
_msgspec_decode: Callable[[bytes], Any] | None = None
_msgspec_skip: Callable[[bytes], Any] | None = None


def load_msgspec() -> tuple[Callable[[bytes], Any], Callable[[bytes], Any]]:
    """Import msgspec (25 ms and 1.1 MiB of RSS, typing_extensions and decimal with it) and use
    it from now on: the daemon does once it has an engine that takes requests, a client once
    it reads a large frame."""
    global _msgspec_decode, _msgspec_skip
    if _msgspec_decode is None or _msgspec_skip is None:
        import msgspec

        _msgspec_skip = msgspec.json.Decoder(msgspec.Raw).decode
        _msgspec_decode = msgspec.json.Decoder().decode
    return _msgspec_decode, _msgspec_skip


def encode_input(value: Any) -> bytes:
    """`encode_value(value)` by orjson (some 20× faster), for a request's input: the same value
    once decoded, maybe other bytes (`1e16` for `1e+16`). What orjson would write otherwise
    (NaN and Infinity as null) or refuses (big integers, non-str keys, subclasses, lone
    surrogates) goes through `encode_value`, with its errors. Until orjson is loaded, by
    `encode_value`, which loads it after an input of ORJSON_AFTER_BYTES or more."""
    orjson: Any = sys.modules.get("orjson")
    if orjson is None:
        encoded = encode_value(value)
        if len(encoded) >= ORJSON_AFTER_BYTES:
            import orjson  # the next inputs are encoded by orjson
        return encoded
    try:
        # Types orjson encodes where `json` refuses them (datetimes, dataclasses, subclasses
        # of str or dict) pass through to its `default`: none is given, so they raise.
        strict = (
            orjson.OPT_PASSTHROUGH_SUBCLASS
            | orjson.OPT_PASSTHROUGH_DATETIME
            | orjson.OPT_PASSTHROUGH_DATACLASS
        )
        out: bytes = orjson.dumps(value, option=strict)
    except TypeError:  # orjson.JSONEncodeError: what `json` encodes alike, or refuses
        return encode_value(value)
    if _find_null(out) is not None:
        from engctl.finite import nonfinite_float_in  # only here: not on every CLI start

        if nonfinite_float_in(value):
            return encode_value(value)  # a NaN or infinity, which orjson wrote as null
    return out


# A compiled pattern finds `null` in 0.04 ms at 115 KB, where `b"null" in out` takes 0.07 (the
# text's many l's slow the bytes search). `re` is loaded by json anyway.
_find_null = re.compile(b"null").search


def encode_doc(doc: Any) -> bytes:
    """A document the daemon built (dicts with str keys, lists, str, int, finite floats, bools,
    None), compact: by orjson once loaded (the daemon loads it at start; 8× `json` for
    `status` at 200 instances), else, or for what orjson refuses (lone surrogates, odd keys,
    integers past 64 bits), by `json` with its errors. orjson would write a non-finite float
    as null where `json` writes NaN: such floats have no place in these documents."""
    if _orjson_doc is not None:
        try:
            return _orjson_doc(doc)
        except TypeError:  # orjson.JSONEncodeError; a UnicodeEncodeError is no TypeError
            pass
    return encode_value(doc)


# orjson's encoder of documents once loaded (`encode_doc`).
_orjson_doc: Callable[[Any], bytes] | None = None


def load_orjson() -> None:
    """Import orjson (0.3 MiB of RSS) and write documents with it from now on: the daemon
    does at start."""
    global _orjson_doc
    import orjson

    # Dataclasses and datetimes go to `default` (none given): they raise, as with `json`.
    passthrough = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
    _orjson_doc = functools.partial(orjson.dumps, option=passthrough)


def raw_result(req_id: int | str | None, raw: bytes) -> bytes:
    """A response frame around `raw`, a result that is already one compact JSON value."""
    return RESULT_FRAME % (encode_value(req_id), raw)


def result_head(req_id: int) -> bytes:
    """How the daemon's response to call `req_id` starts when it carries a result."""
    return RESPONSE_HEAD + b"%d" % req_id + RESULT_MEMBER


def head_id(line: bytes, head: bytes, marker: bytes) -> tuple[int, int] | None:
    """(id, where `marker` starts) of a frame laid out as `head`, a JSON integer id of up to 20
    digits, `marker`: the hand-built frames' ids read without decoding; None for any other."""
    if not line.startswith(head):
        return None
    start = len(head)
    end = line.find(marker, start, start + 20 + len(marker))
    digits = line[start:end]
    # A JSON integer id: digits, no leading zero (json.loads refuses "01").
    if end < 0 or not digits.isdigit() or (digits[0] == 48 and len(digits) > 1):
        return None
    return int(digits), end


def response_id(line: bytes) -> int | None:
    """The integer id of a response that starts as the daemon writes them
    (`{"jsonrpc":"2.0","id":N,...`), read without decoding the frame; None for any other."""
    found = head_id(line, RESPONSE_HEAD, b",")
    return None if found is None else found[0]


def exec_members(params: dict[str, Any]) -> bytes:
    """The members of `params` as they precede `"input":X` in an EXEC_FRAME (b"" for none)."""
    inner = encode_value(params)[1:-1]
    return inner + b"," if inner else b""


def split_exec(line: bytes) -> tuple[int, dict[str, Any], bytes] | None:
    """An EXEC_FRAME as a client writes it: (id, the parameters but the input, the input's
    bytes), the input checked but not decoded into the parameters, to be relayed as
    it came. None for any other frame, or one this does not read alike: `parse_frame` then."""
    found = head_id(line, EXEC_HEAD, _PARAMS_MEMBER)
    if found is None:
        return None
    req_id, comma = found
    # The other parameters, up to the "input" key: read as Latin-1, where a character is a
    # byte, so offsets are byte offsets (UTF-8 never puts a quote or a backslash inside a
    # multibyte character, so the structure scans alike; the values are decoded below).
    start = comma + len(_PARAMS_MEMBER)
    text = line[start : start + _EXEC_MEMBERS_MAX].decode("latin-1")
    i = 0
    try:
        while True:
            key, j = _scan(text, i)
            if type(key) is not str or text[j] != ":":
                return None
            if key == "input":
                break
            _, i = _scan(text, j + 1)
            if text[i] != ",":
                return None
            i += 1
    except (ValueError, StopIteration, IndexError, RecursionError):
        return None
    raw = line[start + j + 1 : -2]
    # Nothing after the input but the two closing braces: no other member, so no duplicate
    # input either. Lone surrogates in the other parameters are judged by parse_frame.
    members = line[start : start + i]
    if not line.endswith(b"}}") or b"\\ud" in members.lower() or not valid_json(raw):
        return None
    try:
        params = loads(b"{" + members[:-1] + b"}") if i else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return req_id, params, raw


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
        obj = loads(line) if isinstance(line, bytes) else _decode(line)
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
