"""The parameter checks of RPC calls: a value of the wrong type is an InvalidParamsError that
names the parameter, never an exception of the handler (the server would call it a bug).

Imports the shared contract only.
"""

from __future__ import annotations

from typing import Any

from engctl import protocol
from engctl.errors import InvalidParamsError


def param(
    params: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    """`params[key]` checked to be of `kind` (numbers finite, no bool); `default` when absent
    or null, and without a default a missing parameter is an error."""
    if key not in params or params[key] is None:
        if default is ...:
            raise InvalidParamsError(f"missing parameter {key!r}")
        return default
    value = params[key]
    if kind in (int, float, (int, float)):
        # One numeric check for every edge: no bool, nan, inf (JSON's 1e999).
        return protocol.number(f"parameter {key!r}", value, integer=kind is int)
    if not isinstance(value, kind):
        raise InvalidParamsError(f"parameter {key!r} has the wrong type: {value!r}")
    return value


def str_list(params: dict[str, Any], key: str, default: Any = ...) -> list[str]:
    """`params[key]` checked to be a list of strings (`default` when absent)."""
    value = param(params, key, list, default)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise InvalidParamsError(f"parameter {key!r} must be a list of strings")
    return value  # type: ignore[no-any-return]
