"""Unit tests of the exception tree: wire codes, exit codes and the round trip over the wire."""

from __future__ import annotations

import pytest

from engctl import errors
from engctl.errors import EngctlError, from_wire

ALL: list[type[EngctlError]] = [EngctlError, *errors._all_subclasses(EngctlError)]


def test_every_error_class_has_a_distinct_rpc_code() -> None:
    """No two classes share a JSON-RPC code, so the client can rebuild the exact class."""
    codes = [cls.rpc_code for cls in ALL]
    assert len(codes) == len(set(codes)), {c.__name__: c.rpc_code for c in ALL}


def test_every_error_class_has_a_documented_exit_code() -> None:
    """Exit codes are within the documented range 1..9."""
    for cls in ALL:
        assert 1 <= cls.exit_code <= 9, cls


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_from_wire_rebuilds_class_message_and_exit_code(cls: type[EngctlError]) -> None:
    """An error sent over the wire comes back as the same class with the same message."""
    exc = cls(f"{cls.__name__} happened", {"engine": "web"})
    back = from_wire(exc.to_wire())
    assert type(back) is cls
    assert back.message == exc.message
    assert str(back) == exc.message
    assert back.exit_code == exc.exit_code
    assert back.data == {"engine": "web"}


def test_to_wire_omits_empty_data() -> None:
    """An error without data has only code and message on the wire."""
    assert errors.BusyError("queue full").to_wire() == {
        "code": errors.BusyError.rpc_code,
        "message": "queue full",
    }


@pytest.mark.parametrize(
    "wire",
    [{"code": 12345, "message": "x"}, {"code": "-32001", "message": "x"}, {"message": "x"}],
)
def test_unknown_codes_give_the_base_error(wire: dict[str, object]) -> None:
    """A code no class claims (or no integer code) gives a plain EngctlError."""
    exc = from_wire(wire)
    assert type(exc) is EngctlError
    assert exc.message == "x"


def test_from_wire_tolerates_missing_message_and_bad_data() -> None:
    """A malformed error member still gives an exception with a message and dict data."""
    exc = from_wire({"code": errors.NotFoundError.rpc_code, "data": [1, 2]})
    assert isinstance(exc, errors.NotFoundError)
    assert exc.message == "unknown error"
    assert exc.data == {}


def test_standard_json_rpc_codes() -> None:
    """Protocol failures use the JSON-RPC 2.0 reserved codes."""
    assert errors.ParseError.rpc_code == -32700
    assert errors.ProtocolError.rpc_code == -32600
    assert errors.MethodNotFoundError.rpc_code == -32601
    assert errors.InvalidParamsError.rpc_code == -32602
    assert errors.InternalError.rpc_code == -32603


def test_spec_errors_are_usage_errors_for_the_cli() -> None:
    """An invalid spec is invalid input: exit code 2, and an InvalidParamsError."""
    assert issubclass(errors.SpecError, errors.InvalidParamsError)
    assert errors.SpecError.exit_code == errors.EXIT_USAGE


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.DaemonUnreachableError, errors.EXIT_UNREACHABLE),
        (errors.NoEligibleEngineError, errors.EXIT_NO_ELIGIBLE),
        (errors.RequestTimeoutError, errors.EXIT_TIMEOUT),
        (errors.BusyError, errors.EXIT_BUSY),
        (errors.EngineNotFoundError, errors.EXIT_NOT_FOUND),
        (errors.UsageError, errors.EXIT_USAGE),
        (errors.LeaseError, errors.EXIT_LEASE),
    ],
)
def test_documented_exit_codes(cls: type[EngctlError], code: int) -> None:
    """Each kind of failure maps to its documented exit code."""
    assert cls.exit_code == code
