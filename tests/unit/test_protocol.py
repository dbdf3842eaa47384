"""Unit tests of JSON-RPC framing: encoding one line per message and rejecting bad frames."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson  # noqa: F401  # loaded: encode_input's orjson path is the one tested
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engctl import protocol
from engctl.errors import BusyError, EngctlError, ParseError, ProtocolError
from tests.conftest import same_json

protocol.load_msgspec()  # loaded: the msgspec paths of loads and valid_json are the ones tested
protocol.load_orjson()  # loaded, as in the daemon: encode_doc's orjson path is the one tested


def one_line(frame: bytes) -> dict[str, Any]:
    """Check that `frame` is a single newline-terminated line and decode it."""
    assert frame.endswith(b"\n")
    assert frame.count(b"\n") == 1
    obj = json.loads(frame)
    assert isinstance(obj, dict)
    return obj


def test_request_frame() -> None:
    """A call is one line with jsonrpc, id, method and params."""
    obj = one_line(protocol.request(7, "engine.list", {"all": True}))
    assert obj == {"jsonrpc": "2.0", "id": 7, "method": "engine.list", "params": {"all": True}}


def test_request_without_id_is_a_notification() -> None:
    """A request with id None has no id member, and no params when none are given."""
    assert one_line(protocol.request(None, "ping")) == {"jsonrpc": "2.0", "method": "ping"}


def test_result_frame() -> None:
    """A result carries the id and the value."""
    obj = one_line(protocol.result("a", {"n": [1, 2]}))
    assert obj == {"jsonrpc": "2.0", "id": "a", "result": {"n": [1, 2]}}


def test_error_frame() -> None:
    """An error carries the id and the exception's wire form."""
    obj = one_line(protocol.error(3, BusyError("queue full", {"queue": 10})))
    assert obj == {
        "jsonrpc": "2.0",
        "id": 3,
        "error": {"code": BusyError.rpc_code, "message": "queue full", "data": {"queue": 10}},
    }


def test_notification_frame() -> None:
    """A notification has a method and params but no id."""
    obj = one_line(protocol.notification("event", {"reason": "x"}))
    assert obj == {"jsonrpc": "2.0", "method": "event", "params": {"reason": "x"}}


def test_newlines_inside_values_stay_escaped() -> None:
    """Strings with newlines and non-ASCII text still give one line that decodes back."""
    value = "line one\nline two\r\n€ ✓"
    obj = one_line(protocol.result(1, value))
    assert obj["result"] == value


def test_frames_round_trip_through_parse_frame() -> None:
    """Every encoded frame parses back to the object it encodes."""
    for frame in (
        protocol.request(1, "m", {"a": 1}),
        protocol.result(1, None),
        protocol.notification("n", {}),
    ):
        assert protocol.parse_frame(frame) == json.loads(frame)


def test_parse_frame_accepts_str_and_trailing_newline() -> None:
    """Frames may be given as text or bytes, with their newline."""
    assert protocol.parse_frame('{"jsonrpc":"2.0","method":"m"}\n')["method"] == "m"


@pytest.mark.parametrize("line", [b"not json", b"{", b"", b"\xff\xfe", b'{"jsonrpc":"2.0"} x'])
def test_parse_frame_rejects_non_json(line: bytes) -> None:
    """Garbage, truncated JSON and invalid UTF-8 raise ParseError."""
    with pytest.raises(ParseError, match="not valid JSON"):
        protocol.parse_frame(line)


def test_parse_frame_rejects_deeply_nested_json_as_parse_error() -> None:
    """Nesting deeper than the decoder can follow is a ParseError, not a RecursionError."""
    with pytest.raises(ParseError):
        protocol.parse_frame(b"[" * 100_000)


@pytest.mark.parametrize("line", [b"[]", b"3", b'"x"', b"null"])
def test_parse_frame_rejects_non_objects(line: bytes) -> None:
    """A JSON value that is not an object is a ProtocolError, not a ParseError."""
    with pytest.raises(ProtocolError, match="must be a JSON object") as info:
        protocol.parse_frame(line)
    assert not isinstance(info.value, ParseError)


@pytest.mark.parametrize("line", [b'{"method":"m"}', b'{"jsonrpc":"1.0","method":"m"}'])
def test_parse_frame_rejects_missing_or_wrong_version(line: bytes) -> None:
    """A frame without "jsonrpc": "2.0" is rejected."""
    with pytest.raises(ProtocolError, match="jsonrpc"):
        protocol.parse_frame(line)


def test_parse_frame_rejects_oversized_frames() -> None:
    """A frame over MAX_FRAME_BYTES is rejected before decoding, naming the limit."""
    padding = "x" * protocol.MAX_FRAME_BYTES
    line = json.dumps({"jsonrpc": "2.0", "method": "m", "params": {"p": padding}}).encode()
    with pytest.raises(ProtocolError, match=f"limit of {protocol.MAX_FRAME_BYTES}"):
        protocol.parse_frame(line)


def test_parse_frame_accepts_a_frame_at_the_limit() -> None:
    """A valid frame of exactly MAX_FRAME_BYTES is accepted."""
    head = b'{"jsonrpc":"2.0","method":"m","params":{"p":"'
    tail = b'"}}'
    line = head + b"x" * (protocol.MAX_FRAME_BYTES - len(head) - len(tail)) + tail
    assert len(line) == protocol.MAX_FRAME_BYTES
    assert protocol.parse_frame(line)["method"] == "m"


def test_parse_request_gives_id_method_params() -> None:
    """A valid call is split into id, method and params; params default to {}."""
    assert protocol.parse_request({"jsonrpc": "2.0", "id": 1, "method": "m"}) == (1, "m", {})
    assert protocol.parse_request(
        {"jsonrpc": "2.0", "id": "x", "method": "m", "params": {"a": 1}}
    ) == ("x", "m", {"a": 1})
    assert protocol.parse_request({"jsonrpc": "2.0", "method": "m"}) == (None, "m", {})


@pytest.mark.parametrize("req_id", [True, 1.5, [1], {"a": 1}])
def test_parse_request_rejects_bad_ids(req_id: Any) -> None:
    """Ids must be strings, integers or absent."""
    with pytest.raises(ProtocolError, match="id must be"):
        protocol.parse_request({"jsonrpc": "2.0", "id": req_id, "method": "m"})


@pytest.mark.parametrize("method", [None, "", 3, ["m"]])
def test_parse_request_rejects_bad_methods(method: Any) -> None:
    """The method must be a non-empty string."""
    obj: dict[str, Any] = {"jsonrpc": "2.0", "id": 1}
    if method is not None:
        obj["method"] = method
    with pytest.raises(ProtocolError, match="method must be"):
        protocol.parse_request(obj)


@pytest.mark.parametrize("params", [[1, 2], "x", 3, None])
def test_parse_request_rejects_non_object_params(params: Any) -> None:
    """Only by-name parameters (an object) are accepted."""
    with pytest.raises(ProtocolError, match="params must be an object"):
        protocol.parse_request({"jsonrpc": "2.0", "id": 1, "method": "m", "params": params})


def test_preview_shortens_and_decodes_leniently() -> None:
    """preview cuts long data with an ellipsis and replaces undecodable bytes."""
    assert protocol.preview(b"abc") == "abc"
    assert protocol.preview("x" * 200, limit=10) == "x" * 10 + "…"
    assert "\ufffd" in protocol.preview(b"\xff ok")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_parse_frame_raises_only_engctl_errors_on_arbitrary_bytes(data: bytes) -> None:
    """Whatever bytes arrive, parse_frame returns an object or raises an EngctlError."""
    try:
        obj = protocol.parse_frame(data)
    except EngctlError:
        return
    assert isinstance(obj, dict)
    assert obj["jsonrpc"] == "2.0"


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["jsonrpc", "id", "method", "params", "x"]), _json))
def test_parse_frame_and_request_raise_only_engctl_errors_on_any_json_object(
    obj: dict[str, Any],
) -> None:
    """Any JSON object is either a valid request or rejected with an EngctlError."""
    frame = json.dumps(obj).encode()
    try:
        req_id, method, params = protocol.parse_request(protocol.parse_frame(frame))
    except EngctlError:
        return
    assert isinstance(method, str) and method
    assert isinstance(params, dict)
    assert req_id is None or isinstance(req_id, int | str)


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.integers(), st.text(max_size=10), st.none()), st.text(min_size=1), _json)
def test_encoded_requests_always_parse_back(req_id: Any, method: str, value: Any) -> None:
    """Every request the encoder writes is one line that parse_request accepts unchanged."""
    frame = protocol.request(req_id, method, {"v": value})
    assert frame.count(b"\n") == 1
    assert protocol.parse_request(protocol.parse_frame(frame)) == (req_id, method, {"v": value})


def _loads_outcome(fn: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "ok", fn(data)
    except (ValueError, RecursionError) as exc:
        return type(exc).__name__, str(exc)


@pytest.mark.parametrize(
    "data",
    [
        b'{"jsonrpc":"2.0","id":1,"result":{"echo":1}}',
        b'  {"a": 1} \r',
        b'{"a":1}{"b":2}',
        b"\xef\xbb\xbf{}",  # UTF-8 BOM: json.loads accepts it
        '{"a":"é"}'.encode("utf-16"),
        '{"a":1}'.encode("utf-16-le"),
        b'"\xed\xa0\x80"',  # a lone surrogate: json.loads passes it through
        b"[" * 100_000,
        b"\xff{}",
        b"",
        b"1",
        b"NaN",
    ],
)
def test_loads_is_json_loads(data: bytes) -> None:
    """The fast path of `loads` returns and raises exactly what json.loads does."""
    assert _loads_outcome(protocol.loads, data) == _loads_outcome(json.loads, data)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_encode_value_is_the_compact_encoding(value: Any) -> None:
    """The int and str fast paths of encode_value give the same bytes as the encoder."""
    expected = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    assert protocol.encode_value(value) == expected


# -- the edge checks of issue 9.12 and 9.13 --------------------------------------------------
@pytest.mark.parametrize(
    ("value", "kw", "message"),
    [
        (float("nan"), {}, "must be a finite number"),
        (float("inf"), {}, "must be a finite number"),
        (float("-inf"), {}, "must be a finite number"),
        (10**400, {}, "must be a finite number"),
        (True, {}, "must be a number"),
        ("3", {}, "must be a number"),
        (None, {}, "must be a number"),
        (2.5, {"integer": True}, "must be an integer"),
        (float("inf"), {"integer": True}, "must be an integer"),
        (0, {"positive": True}, "must be positive"),
        (-1, {"minimum": 0}, "must be 0 or more"),
    ],
)
def test_number_refuses_what_is_not_a_finite_number_in_bounds(
    value: Any, kw: dict[str, Any], message: str
) -> None:
    """protocol.number, the one numeric check of both edges, refuses nan, inf, 1e999, bools,
    strings and out-of-bound values with InvalidParamsError naming the parameter."""
    from engctl.errors import InvalidParamsError

    with pytest.raises(InvalidParamsError, match=f"^timeout {message}"):
        protocol.number("timeout", value, **kw)


@given(st.floats(allow_nan=False, allow_infinity=False, min_value=1e-9))
def test_number_accepts_every_positive_finite_float(value: float) -> None:
    assert protocol.number("timeout", value, positive=True) == value


def test_lone_surrogates_are_invalid_params_when_encoded_or_checked() -> None:
    """A string with a lone surrogate (valid JSON escape, not UTF-8) is InvalidParamsError
    wherever it would be encoded, and check_unicode finds it in keys and values; a real pair
    (an emoji written as two escapes) is fine."""
    from engctl.errors import InvalidParamsError

    for bad in ({"input": "\ud800"}, {"\udfff": 1}, ["a", ["\udc80"]]):
        with pytest.raises(InvalidParamsError, match="lone surrogate"):
            protocol.check_unicode(bad)
        with pytest.raises(InvalidParamsError, match="lone surrogate"):
            protocol.dumps(bad)
    with pytest.raises(InvalidParamsError, match="lone surrogate"):
        protocol.encode_value("\ud800")
    protocol.check_unicode(json.loads('"\\ud83d\\ude00"'))


def test_call_with_null_id_is_refused() -> None:
    """`"id": null` is refused (JSON-RPC 2.0 discourages it: null answers unreadable ids);
    a missing id is a notification and stays valid."""
    with pytest.raises(ProtocolError, match="null is refused"):
        protocol.parse_request({"jsonrpc": "2.0", "id": None, "method": "status.get"})
    assert protocol.parse_request({"jsonrpc": "2.0", "method": "status.get"})[0] is None


def test_value_too_deep_to_encode_is_invalid_params() -> None:
    """A value nested deeper than the encoder's recursion allows is InvalidParamsError (a
    payload the CLI parsed can still be too deep to send), not a RecursionError."""
    from engctl.errors import InvalidParamsError

    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    for encode in (protocol.dumps, protocol.encode_value, protocol.check_unicode):
        with pytest.raises(InvalidParamsError, match="nests too deeply"):
            encode(deep)


# -- the hand-built frames (issue 11: every template in protocol.py, one result encoder) --------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(
    value=JSON_VALUES,
    ok=st.booleans(),
    latency=st.floats(min_value=0, max_value=1e6),
    attempts=st.integers(min_value=0, max_value=9),
    explain=st.none() | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
def test_exec_result_is_the_one_encoding_of_the_result_object(
    value: Any, ok: bool, latency: float, attempts: int, explain: dict[str, int] | None
) -> None:
    """The `request.exec` result object has one encoder: its members in the documented order,
    the latency to the microsecond, `explain` when given and the result spliced in as the
    worker wrote it; the response frame around it is what the client reads back."""
    raw = protocol.encode_value(value)
    result = raw if ok else None
    encoded = protocol.exec_result(
        "r1-7", "echo", "echo#0", ok, latency, attempts, explain=explain, result=result
    )
    obj = json.loads(encoded)
    keys = ["request_id", "engine", "instance", "ok", "latency_ms", "attempts"]
    keys += ["explain"] * (explain is not None) + ["result"] * ok
    assert list(obj) == keys
    assert obj["ok"] is ok and obj["attempts"] == attempts and obj["instance"] == "echo#0"
    assert obj["latency_ms"] == round(latency, 3)
    if ok:
        assert obj["result"] == value
        assert encoded.endswith(b',"result":' + raw + b"}")
    frame = protocol.raw_result(41, encoded)
    assert frame.startswith(protocol.result_head(41))
    assert one_line(frame) == {"jsonrpc": "2.0", "id": 41, "result": obj}


def test_exec_frame_carries_the_input_and_the_other_parameters() -> None:
    """`Client.exec`'s frame: the id, the other parameters, the input last; the daemon splits
    it into the parameters and the input's bytes."""
    for params in ({}, {"type": "echo", "retries": 2}):
        frame = protocol.EXEC_FRAME % (9, protocol.exec_members(params), b'{"a":[1]}')
        assert one_line(frame) == {
            "jsonrpc": "2.0",
            "method": "request.exec",
            "params": {"input": {"a": [1]}, **params},
            "id": 9,
        }
        assert protocol.split_exec(frame[:-1]) == (9, params, b'{"a":[1]}')


# Inputs that stress the orjson and msgspec paths: integers past 64 bits, non-finite floats,
# None (orjson writes NaN as null), non-str keys, lone surrogates, deep nesting, unicode.
_inputs = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats()
    | st.text(st.characters(), max_size=8)
    | st.sampled_from(["\ud800", "é€😀", "\u2028", "\x7f"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), inner, max_size=4)
    ),
    max_leaves=16,
)


def _parsed(frame: bytes) -> dict[str, Any] | None:
    """What parse_frame reads from `frame`, or None where it refuses it."""
    try:
        return protocol.parse_frame(frame)
    except EngctlError:
        return None


def _outcome(fn: Any, *args: Any) -> tuple[str, Any]:
    try:
        return "ok", fn(*args)
    except (ValueError, RecursionError, TypeError, EngctlError) as exc:
        return type(exc).__name__, str(exc)


def _assert_reads_back_as_encode_value(encode: Callable[[Any], bytes], value: Any) -> None:
    """`encode(value)` reads back (`json`) as the same value as `encode_value`'s bytes, or
    fails with the same error."""
    fast, slow = _outcome(encode, value), _outcome(protocol.encode_value, value)
    assert fast[0] == slow[0]
    if fast[0] == "ok":
        assert same_json(json.loads(fast[1]), json.loads(slow[1]))
    else:
        assert fast == slow


@settings(max_examples=400, deadline=None)
@given(_inputs)
def test_encode_input_decodes_to_what_encode_value_writes(value: Any) -> None:
    """Issue 13: the orjson encoder of inputs writes what `json` reads back as the same value
    as `encode_value`'s bytes, and refuses what `encode_value` refuses, with its error."""
    _assert_reads_back_as_encode_value(protocol.encode_input, value)


@settings(max_examples=400, deadline=None)
@given(_inputs, st.booleans())
def test_loads_is_json_loads_on_generated_json(value: Any, ascii_only: bool) -> None:
    """Issue 13: `loads` (msgspec where it reads the same value) gives exactly what json.loads
    gives, integers past 64 bits, NaN and lone surrogates included."""
    try:
        data = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return
    fast, slow = _outcome(protocol.loads, data), _outcome(json.loads, data)
    assert fast[0] == slow[0]
    assert fast[0] != "ok" or same_json(fast[1], slow[1])


_members = st.dictionaries(
    st.sampled_from(["type", "engine", "timeout", "x", "inpu", "é"]),
    _inputs,
    max_size=3,
)


@settings(max_examples=400, deadline=None)
@given(_members, _inputs, st.integers(0, 2**70), st.sampled_from(["", "dup", "esc", "ws", "tail"]))
def test_split_exec_reads_what_parse_frame_reads(
    params: dict[str, Any], value: Any, req_id: int, twist: str
) -> None:
    """Issue 13: an exec frame is split into (id, parameters, input bytes) only when
    parse_frame reads the same id, parameters and input from it; a duplicate or escaped
    "input" key, whitespace, trailing members or what only `json` reads are left to it."""
    try:
        members = protocol.exec_members(params)
        raw = protocol.encode_input(value)
    except (EngctlError, TypeError):
        return
    frame = protocol.EXEC_FRAME[:-1] % (req_id, members, raw)
    if twist == "dup":
        frame = frame.replace(b'"input":', b'"input":1,"input":', 1)
    elif twist == "esc":
        frame = frame.replace(b'"input":', b'"inp\\u0075t":', 1)
    elif twist == "ws":
        frame = frame.replace(b'"input":', b'"input" : ', 1)
    elif twist == "tail":
        frame = frame[:-1] + b',"input":2}'
    split = protocol.split_exec(frame)
    obj = _parsed(frame)
    if obj is None:
        assert split is None
        return
    if split is None:
        return
    got_id, got_params, got_raw = split
    assert got_id == obj["id"]
    assert same_json({**got_params, "input": json.loads(got_raw)}, obj["params"])


def test_worker_frames_are_requests_of_the_worker_protocol() -> None:
    """What the daemon writes to a worker: `execute` with the input, and `ping`."""
    execute = one_line(protocol.WORKER_EXECUTE % (3, b'"x"'))
    assert execute == {"jsonrpc": "2.0", "id": 3, "method": "execute", "params": {"input": "x"}}
    assert one_line(protocol.WORKER_PING % 4) == {"jsonrpc": "2.0", "id": 4, "method": "ping"}


@pytest.mark.parametrize(
    "data",
    [
        b'"\xff"',  # not UTF-8 inside a string: msgspec's skip does not look there
        b'"\xed\xa0\x80"',  # a surrogate's bytes: json reads them, a strict decoder does not
        b"[" * 100_000 + b"]" * 100_000,
        b"[1,]",
        b"01",
        b'"\\ud800"',
        b"NaN",
        b"1 2",
        b"",
        b"\xef\xbb\xbf1",
    ],
)
def test_valid_json_refuses_what_cannot_be_relayed(data: bytes) -> None:
    """Issue 13: what msgspec's skip lets through but is no JSON a worker reads alike (bytes
    that are not UTF-8 inside a string) is refused; so is all that only `json` reads."""
    assert not protocol.valid_json(data)


@settings(max_examples=400, deadline=None)
@given(_inputs, st.binary(max_size=3), st.integers(0, 200), st.booleans())
def test_valid_json_only_passes_what_json_reads(
    value: Any, junk: bytes, at: int, ascii_only: bool
) -> None:
    """Issue 13: a value `valid_json` passes (to be relayed as its bytes) is one `json.loads`
    reads, and reads as msgspec does; generated values with junk bytes spliced in included."""
    try:
        data = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return
    for candidate in (data, data[:at] + junk + data[at:]):
        if protocol.valid_json(candidate):
            assert same_json(json.loads(candidate), protocol.loads(candidate))


_docs = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(), max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), inner, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=400, deadline=None)
@given(_docs)
def test_encode_doc_is_read_back_as_encode_value_is(doc: Any) -> None:
    """Issue 13: the daemon's documents (status) encoded by orjson read back as what `json`
    writes, or fail with its error (lone surrogates); integers past 64 bits and keys that are
    no strings included."""
    _assert_reads_back_as_encode_value(protocol.encode_doc, doc)


def test_encode_doc_of_keys_orjson_refuses_is_json_s() -> None:
    """Keys orjson refuses (booleans, None, numbers) are written as `json` writes them."""
    doc = {True: 1, None: [2], "a": {False: None, 3: 1.5}}
    assert protocol.encode_doc(doc) == protocol.encode_value(doc)


def test_encode_doc_refuses_what_json_refuses() -> None:
    """A datetime or a dataclass in a document fails as with `json` (TypeError), where orjson
    alone would write them; a subclass of str, as an enum's member, is its text, as in `json`."""
    import dataclasses
    import datetime

    @dataclasses.dataclass
    class Point:
        x: int

    for odd in (datetime.datetime(2026, 1, 1), Point(1)):
        with pytest.raises(TypeError):
            protocol.encode_doc({"at": odd})
    doc = {"state": protocol.StrategyName.LEAST_LOADED, "n": [1, 2**70]}
    assert json.loads(protocol.encode_doc(doc)) == json.loads(protocol.encode_value(doc))


@settings(max_examples=300, deadline=None)
@given(
    req_id=st.one_of(st.integers(-5, 2**70), st.text(max_size=4), st.none()),
    body=st.sampled_from(['"result":1', '"error":{"code":1,"message":"m"}', '"result":"x,y"']),
    twist=st.sampled_from(["", "space", "zero", "order"]),
)
def test_response_id_is_the_id_parse_frame_reads(req_id: Any, body: str, twist: str) -> None:
    """Issue 13: `exec_many` keeps early answers as frames, filed by the id read from their
    head (`response_id`): an integer only when parse_frame reads that same integer, else None
    (and the frame is decoded)."""
    line = b'{"jsonrpc":"2.0","id":' + json.dumps(req_id).encode() + b"," + body.encode() + b"}"
    if twist == "space":
        line = line.replace(b'"id":', b'"id": ', 1)
    elif twist == "zero":
        line = line.replace(b'"id":', b'"id":0', 1)
    elif twist == "order":
        line = line.replace(b'"jsonrpc":"2.0","id":', b'"id":', 1)[:-1] + b',"jsonrpc":"2.0"}'
    got = protocol.response_id(line)
    msg = _parsed(line)
    if msg is None:
        assert got is None
        return
    if got is not None:
        assert type(msg["id"]) is int and msg["id"] == got
    elif not twist and type(req_id) is int and 0 <= req_id < 10**20:
        raise AssertionError(f"the daemon's own head was not read: {line!r}")


def test_hand_built_frames_are_read_fast_with_ids_of_up_to_20_digits() -> None:
    """Regression: `split_exec` looked for the parameters within 21 bytes of the id's start,
    which the 11 bytes of `,"params":{` left 10 digits of: a longer id took the decoding path.
    One reader (`head_id`) now serves requests, worker replies and daemon responses alike."""
    for req_id in (7, 10**10, 10**19, 2**64 - 1):
        frame = protocol.EXEC_FRAME[:-1] % (req_id, b"", b"[1]")
        assert protocol.split_exec(frame) == (req_id, {}, b"[1]")
        assert protocol.response_id(protocol.raw_result(req_id, b"1")) == req_id
        reply = protocol.result_head(req_id) + b"1}"
        assert protocol.head_id(reply, protocol.RESPONSE_HEAD, protocol.RESULT_MEMBER) == (
            req_id,
            reply.index(protocol.RESULT_MEMBER),
        )
    assert protocol.split_exec(protocol.EXEC_FRAME[:-1] % (10**20, b"", b"1")) is None
