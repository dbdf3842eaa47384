"""`engctl.finite`: a NaN or an infinity is found among a value's floats at any depth, and
nothing else is taken for one (the oracle: `json.dumps(allow_nan=False)` refuses exactly those)."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from engctl import protocol, worker
from engctl.finite import nonfinite_float_in
from tests.conftest import same_json

_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(_values)
@example(float("nan"))
@example([[[[{"a": (1, float("-inf"))}]]]])
@example({"a": None, "b": [None, 1.5]})
def test_a_nonfinite_float_is_found_where_json_refuses_one(value: Any) -> None:
    try:
        json.dumps(value, allow_nan=False)
        refused = False
    except ValueError:
        refused = True
    assert nonfinite_float_in(value) is refused


def test_a_payload_with_none_keeps_orjson_bytes_and_a_nan_keeps_jsons_meaning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13 (regression): any `null` in orjson's bytes sent the whole value through `json`
    again (16x orjson's time at 115 KB), though most are None. Only a NaN or an infinity does
    now, on both ends: the client's input and the worker's reply."""
    slow: list[str] = []
    encode_value, dumps = protocol.encode_value, json.dumps

    def input_by_json(value: Any) -> bytes:
        slow.append("input")
        return encode_value(value)

    def reply_by_json(*args: Any, **kwargs: Any) -> str:
        slow.append("reply")
        return dumps(*args, **kwargs)

    monkeypatch.setattr(protocol, "encode_value", input_by_json)
    monkeypatch.setattr(json, "dumps", reply_by_json)  # what the worker falls back to
    records = [{"id": k, "note": None, "score": k / 7} for k in range(2000)]
    assert json.loads(protocol.encode_input(records)) == records
    assert json.loads(worker._response(3, {"rows": records}, None))["result"]["rows"] == records
    assert slow == []  # orjson's bytes, None and all
    records[1500]["score"] = math.nan
    assert b"NaN" in protocol.encode_input(records)
    reply = worker._response(3, {"rows": records}, None)
    assert math.isnan(json.loads(reply)["result"]["rows"][1500]["score"])
    assert slow == ["input", "reply"]


@settings(max_examples=400, deadline=None)
@given(st.one_of(_values, st.sampled_from(["\ud800", 2**70, [None, float("inf")]])))
def test_a_workers_reply_reads_back_as_jsons_would(value: Any) -> None:
    """Issue 13: `serve`'s reply (orjson's bytes where they mean what `json` writes) reads back
    as the reply `json` writes, NaN, infinities, None, big integers and tuples included."""
    fast = json.loads(worker._response(1, value, None))
    slow = json.loads(json.dumps({"jsonrpc": "2.0", "id": 1, "result": value}))
    assert same_json(fast, slow)
