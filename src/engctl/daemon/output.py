"""What engines print, parsed: every worker protocol line and every oneshot stdout goes
through `decode`, which turns any parse failure into an `OutputError` (a protocol error of
that instance, never an exception that escapes into the event loop).

Pure functions over bytes: no process, no loop. `reply` also finds the raw bytes of a
reply's `result`, so the router can splice them into the client's frame unchanged.

Imports the shared contract only.
"""

from __future__ import annotations

import json
from typing import Any

from engctl.protocol import RESPONSE_HEAD, RESULT_MEMBER, head_id, valid_json

# The longest worker protocol line the daemon reads. A result is
# delivered to its client in one frame of its own size plus an envelope of a few hundred
# bytes, and the client reads frames up to `engctl.client.MAX_RESPONSE_BYTES` (256 MiB):
# keep this well under that, so that every result a worker may send can also be delivered
# (the server's write buffer must take one such frame). It also bounds the daemon's memory
# per instance: a longer line is a protocol error, discarded as it arrives, never buffered.
MAX_WORKER_LINE = 64 * 1024 * 1024
# The most stdout a oneshot run may print. Output that is not JSON is sent as a JSON string,
# and an escaped control character takes 6 bytes (\u0000): 6 × this, plus the envelope, must
# stay under the client's frame limit too.
MAX_ONESHOT_OUTPUT = 16 * 1024 * 1024

_decoder = json.JSONDecoder()
# The C scanner under `JSONDecoder.decode`: (value, end) from an offset, without the
# whitespace passes (the walk of `_result_span`).
_scan = _decoder.scan_once  # type: ignore[attr-defined]
_WS = " \t\n\r"  # JSON's whitespace: what json.loads allows around a value
_WSB = _WS.encode()
# The prefix of the canonical reply `{"jsonrpc":"2.0","id":N,"result":X}` (protocol's layout).
_HEAD = RESPONSE_HEAD
_RESULT = RESULT_MEMBER


class OutputError(Exception):
    """Output that does not parse: why, in a few words (`not JSON`, `nested too deeply`)."""


def decode(data: bytes) -> Any:
    """The JSON value of UTF-8 `data`, as `json.loads` reads it; any failure (not UTF-8,
    not JSON, nested too deeply for the parser) is an OutputError."""
    try:
        return json.loads(data.decode())
    except RecursionError:
        raise OutputError("JSON nested too deeply") from None
    except UnicodeDecodeError:
        raise OutputError("not UTF-8") from None
    except ValueError:  # json.JSONDecodeError: the excerpt of the line says more
        raise OutputError("not JSON") from None


def reply(line: bytes) -> tuple[Any, bytes | None]:
    """A UTF-8 worker line decoded as `json.loads` does (the last of duplicate keys wins), and the
    raw bytes of its top-level `result` value when it is an object that has one.

    The canonical reply `{"jsonrpc":"2.0","id":N,"result":X}` is not decoded: X is checked by
    msgspec, and the message holds the other members only (X is in the raw bytes). Anything
    else (other key order, duplicate or escaped keys, what only `json` reads) is decoded
    whole, then walked for the span of the `result` member that `json.loads` keeps. Either way
    the raw bytes decode to exactly `json.loads(line)["result"]`. Raises OutputError for a
    line that does not parse.
    """
    found = head_id(line, _HEAD, _RESULT)
    if found is not None:
        wid, comma = found
        start = comma + len(_RESULT)
        stop = len(line.rstrip(_WSB)) - 1
        # Nothing after the value but the closing brace: no other member, so no
        # duplicate either; msgspec checks the value without the line being decoded.
        raw = line[start:stop]
        if stop > start and line[stop] == 125 and valid_json(raw):  # 125: "}"
            return {"jsonrpc": "2.0", "id": wid}, raw.strip(_WSB)
    obj = decode(line)
    if not isinstance(obj, dict) or "result" not in obj:
        return obj, None
    return obj, _result_span(line)


def _result_span(line: bytes) -> bytes:
    """The raw bytes of the last top-level `result` member of a line that decodes to an
    object (already checked, so this walk cannot fail)."""
    text = line.decode()
    i = _skip(text, 0) + 1  # past "{"
    found = (0, 0)
    while True:
        i = _skip(text, i)
        if text[i] == "}":
            break
        key, i = _scan(text, i)
        i = _skip(text, i) + 1  # past ":"
        i = _skip(text, i)
        _, end = _scan(text, i)
        if key == "result":
            found = (i, end)  # the last one wins, as in json.loads
        i = _skip(text, end)
        if text[i] == ",":
            i += 1
            continue
        break
    start, end = found
    return text[start:end].encode()


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i
