"""`Client.exec`/`exec_many` options: one typed set (documents.ExecOptions) checked at run
time too, so a misspelt option fails instead of being left out of the request."""

from __future__ import annotations

import typing

import pytest

from engctl.client import EXEC_OPTIONS, exec_params
from engctl.documents import ExecOptions


def test_exec_options_at_run_time_are_the_typed_ones() -> None:
    """The run-time list of options is the TypedDict's keys."""
    assert frozenset(typing.get_type_hints(ExecOptions)) == EXEC_OPTIONS


def test_a_misspelt_exec_option_is_a_type_error() -> None:
    """`typ="echo"` is refused like any unknown keyword argument."""
    with pytest.raises(TypeError, match="'typ'"):
        exec_params(typ="echo")  # type: ignore[call-arg]


def test_exec_params_leave_out_unset_options_and_spell_labels_as_pairs() -> None:
    """Unset, empty and default options are left out; labels become `k=v` strings."""
    assert exec_params() == {}
    assert exec_params(type="echo", labels={"tier": "gold"}, require=("fp32",), retries=0) == {
        "type": "echo",
        "labels": ["tier=gold"],
        "require": ["fp32"],
    }
