"""The `engctl exec` command line: options, repeatable options, `--`, and its errors."""

from __future__ import annotations

import pytest

from engctl.cli.exec import parse_args, parse_payload
from engctl.errors import UsageError
from engctl.protocol import STRATEGIES, StrategyName


def test_every_option_lands_in_its_field() -> None:
    """Value options, `--opt=value`, short names, repeatables and flags are all parsed."""
    o = parse_args(
        [
            "-t",
            "onnx",
            "--engine=e1",
            "-i",
            "e1#0",
            "--cap",
            "fp16",
            "--cap",
            "batch",
            "--prefer",
            "x",
            "--label",
            "tier=gold",
            "-s",
            "consistent_hash",
            "-k",
            "user-42",
            "--timeout",
            "2.5",
            "--retries",
            "2",
            "--json",
            "--explain",
            "--json-input",
            "--batch",
            "-j",
            "16",
        ]
    )
    assert (o.type, o.engine, o.instance) == ("onnx", "e1", "e1#0")
    assert (o.cap, o.prefer, o.label) == (["fp16", "batch"], ["x"], ["tier=gold"])
    assert (o.strategy, o.key, o.timeout, o.retries, o.jobs) == (
        "consistent_hash",
        "user-42",
        2.5,
        2,
        16,
    )
    assert o.json and o.explain and o.json_input and o.batch and not o.help
    assert o.payload is None


@pytest.mark.parametrize(
    ("args", "payload"),
    [
        (["--", "-5"], "-5"),
        (["-"], "-"),
        (["--type", "t", '{"x": 1}'], '{"x": 1}'),
        (["--", "--json"], "--json"),
    ],
)
def test_payload_forms(args: list[str], payload: str) -> None:
    """The payload is the positional argument, or whatever follows `--` (even a dash)."""
    assert parse_args(args).payload == payload


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "unknown option --bogus"),
        (["--type"], "option --type needs a value"),
        (["--retries", "x"], "expects an integer"),
        (["--timeout", "soon"], "expects a number"),
        (["--json=yes"], "takes no value"),
        (["-s", "fastest"], "unknown strategy 'fastest'"),
        (["a", "b"], "one payload expected"),
        (["--", "a", "b"], "one payload expected after --"),
    ],
)
def test_errors_name_the_argument(args: list[str], message: str) -> None:
    """A bad command line is a UsageError (exit 2) that names what is wrong."""
    with pytest.raises(UsageError, match=message):
        parse_args(args)


def test_payload_text_is_json_when_it_parses_else_a_string() -> None:
    """JSON text is sent as its value; other text as a string unless --json-input."""
    assert parse_payload('{"a": [1, 2]}', json_input=False) == {"a": [1, 2]}
    assert parse_payload("hello world\n", json_input=False) == "hello world"
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_payload("hello", json_input=True)


def test_strategy_names_agree_everywhere() -> None:
    """The CLI and the daemon config (both check against protocol.STRATEGIES) and the
    selection layer know the same seven strategies."""
    assert set(STRATEGIES) == {s.value for s in StrategyName}
