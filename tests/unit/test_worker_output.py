"""Parsing what engines print (`engctl.daemon.output`): the spliced result of a worker reply
is exactly what plain `json` decodes, and every parse failure is an OutputError."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engctl.daemon.oneshot import decode_output
from engctl.daemon.output import OutputError, decode, reply
from engctl.protocol import load_msgspec

load_msgspec()  # loaded, as in the daemon: the msgspec check of replies is the one tested

# JSON values, with the strings that stress a splice: escapes, quotes, braces, unicode.
_text = st.text(
    st.one_of(
        st.sampled_from(list('"\\{}[],:/\n\t\x00\x1f é€😀\u2028')),
        st.characters(exclude_categories=["Cs"]),
    ),
    max_size=12,
)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=12,
)
_ws = st.sampled_from(["", " ", "\t", "\r", "  \r"])


def _dumps(value: Any, compact: bool, ascii_only: bool) -> str:
    seps = (",", ":") if compact else (", ", ": ")
    return json.dumps(value, separators=seps, ensure_ascii=ascii_only)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Replies as workers write them: canonical, reordered, spaced, with duplicate or escaped
    keys, extra members, and trailing whitespace."""
    wid = draw(st.integers(0, 10**6))
    members: list[tuple[str, str]] = [
        ('"jsonrpc"', '"2.0"'),
        ('"id"', str(wid)),
        ('"result"', _dumps(draw(_values), draw(st.booleans()), draw(st.booleans()))),
    ]
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(['"id"', '"result"', '"jsonrpc"', '"res\\u0075lt"', '"x"']))
        members.insert(
            draw(st.integers(0, len(members))),
            (key, _dumps(draw(_values), draw(st.booleans()), draw(st.booleans()))),
        )
    if draw(st.booleans()):
        members = draw(st.permutations(members))
    sp = draw(_ws)
    body = ",".join(f"{sp}{k}{draw(_ws)}:{draw(_ws)}{v}" for k, v in members)
    return f"{draw(_ws)}{{{body}{draw(_ws)}}}{draw(_ws)}".encode()


def _same(a: Any, b: Any) -> bool:
    """JSON equality where -0.0 and 0.0 differ in text but not in value (floats compare)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return bool(a == b)


@settings(max_examples=600, deadline=None)
@given(line=frames())
@example(line=b'{"jsonrpc":"2.0","id":1,"result":{"a":1},"id":1}')
@example(line=b'{"jsonrpc":"2.0","id":1,"result":{"a":1},"result":2}')
@example(line=b'{"jsonrpc":"2.0","id":1,"result":{"a":1},"leak":"x"}')
@example(line=b'{"jsonrpc":"2.0","id":1,"result":{"a":1},"jsonrpc":"2.0"}')
@example(line=b'{"jsonrpc":"2.0","id":1,"result":"}"}')
@example(line=b'{"jsonrpc":"2.0","id":1,"result":1 }')
@example(line=b'{"jsonrpc":"2.0","id":1,"res\\u0075lt":5,"result":6}')
@example(line=b'{"jsonrpc":"2.0","id":1,"result":6,"res\\u0075lt":5}')
@example(line='{"jsonrpc":"2.0","id":7,"result":"é€😀"}\r'.encode())
def test_spliced_result_decodes_to_what_json_keeps(line: bytes) -> None:
    """Issue 10.4: whatever the frame (duplicate keys, whitespace, escapes, nesting, unicode),
    the message is what `json.loads` gives and the raw result bytes decode to exactly its
    `result`: the spliced fast path and the decoded path cannot differ."""
    expected = json.loads(line)
    msg, raw = reply(line)
    # The canonical reply's result is in `raw` only (checked, not decoded): the rest is json's.
    assert {k: v for k, v in msg.items() if k != "result"} == {
        k: v for k, v in expected.items() if k != "result"
    }
    assert raw is not None
    assert _same(json.loads(raw), expected["result"])
    # The reply the client gets is the raw bytes spliced into a frame: it parses whole.
    frame = b'{"request_id":"r-1","ok":true,"result":%s}' % raw
    assert _same(json.loads(frame)["result"], expected["result"])


@settings(max_examples=300, deadline=None)
@given(value=_values, adversarial=st.sampled_from(["", "NaN", "-Infinity", '"\\ud800"', "1e999"]))
def test_canonical_reply_checked_by_msgspec_is_what_json_decodes(
    value: Any, adversarial: str
) -> None:
    """Issue 13: the canonical reply checked by msgspec (not decoded) gives raw bytes that
    `json` decodes to its result, big integers included; what only `json` reads (NaN,
    Infinity, lone surrogates, 1e999) takes the decoding path, with the same outcome."""
    result = json.dumps([value, json.loads(adversarial)] if adversarial else value)
    line = f'{{"jsonrpc":"2.0","id":3,"result":{result}}}'.encode()
    msg, raw = reply(line)
    assert raw is not None and msg["id"] == 3
    assert _same_deep(json.loads(raw), json.loads(result))


def _same_deep(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_deep(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_deep(a[k], b[k]) for k in a)
    return _same(a, b) and type(a) is type(b)


def test_duplicate_id_does_not_leak_into_the_result() -> None:
    """Issue 10.4: the frame from the report: the result is {"a": 1}, nothing after it."""
    msg, raw = reply(b'{"jsonrpc":"2.0","result":{"a":1},"id":1,"id":1}')
    assert msg == {"jsonrpc": "2.0", "result": {"a": 1}, "id": 1}
    assert raw == b'{"a":1}'
    _, raw = reply(b'{"jsonrpc":"2.0","id":1,"result":{"a":1},"id":1}')
    assert raw == b'{"a":1}'


def test_canonical_reply_is_spliced_byte_for_byte() -> None:
    """The common reply keeps the worker's own bytes for its result (no re-encoding)."""
    line = '{"jsonrpc":"2.0","id":12,"result":{"k": [1.50, "é\\u00e9"]}}'.encode()
    msg, raw = reply(line)
    assert raw == '{"k": [1.50, "é\\u00e9"]}'.encode()
    assert msg == {"jsonrpc": "2.0", "id": 12}
    assert json.loads(raw) == {"k": [1.5, "éé"]}


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        (b'{"jsonrpc":"2.0","id":1,"result":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "deeply"),
        (b'{"jsonrpc":"2.0","id":1,"result":"\xff"}', "not UTF-8"),
        (b"GARBAGE", "not JSON"),
        (b'{"jsonrpc":"2.0","id":1,"result":1}}', "not JSON"),
        (b'{"jsonrpc":"2.0","id":01,"result":1}', "not JSON"),
        (b"", "not JSON"),
    ],
)
def test_every_parse_failure_is_an_output_error(line: bytes, why: str) -> None:
    """Issue 9.10: nesting past the parser's depth, bytes that are not UTF-8 and plain
    garbage all raise OutputError (a protocol error), never RecursionError or another
    exception that would escape into the event loop."""
    with pytest.raises(OutputError, match=why):
        reply(line)
    with pytest.raises(OutputError):
        decode(line)


def test_replies_without_result_have_no_raw_bytes() -> None:
    """Errors and notifications are decoded whole; only a result is spliced."""
    assert reply(b'{"jsonrpc":"2.0","method":"ready"}') == (
        {"jsonrpc": "2.0", "method": "ready"},
        None,
    )
    msg, raw = reply(b'{"jsonrpc":"2.0","id":3,"error":{"code":1,"message":"m"}}')
    assert raw is None and msg["error"]["message"] == "m"
    assert reply(b"[1,2]") == ([1, 2], None)


def test_oneshot_output_that_does_not_parse_is_its_text() -> None:
    """Issue 9.10: a oneshot's stdout is JSON when it parses; anything else, deep nesting
    included, is its text (a valid result), never an exception."""
    assert decode_output(b'{"a": [1]}\n') == {"a": [1]}
    deep = b"[" * 100_000 + b"]" * 100_000
    assert decode_output(deep) == deep.decode()
    assert decode_output(b"plain text\n") == "plain text"
    assert decode_output(b"\xff\xfe bytes") == "\ufffd\ufffd bytes"
