"""Unit tests of shell completion without typer (issue 10.24): what each position completes
to, from the generated table and a stand-in for the daemon's names; the table is current."""

from __future__ import annotations

import pytest

from engctl.cli import complete
from engctl.cli.completion_table import TABLE

NAMES = {
    "engines": ["web", "worker", "db"],
    "instances": ["web#0", "web#1", "worker#0", "db#0"],
    "types": ["http", "onnx", "http"],
    "labels": ["tier=gold", "tier=silver"],
}


def names(kind: str) -> list[str]:
    return NAMES[kind]


def done(line: str) -> list[str]:
    """The completions of `line` (words split on spaces; a trailing space: an empty word)."""
    return complete.candidates(line.split(" "), names)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("st", ["start", "status", "stop"]),
        ("daemon st", ["start", "status", "stop"]),
        ("policy ", ["show"]),
        ("register web --mode ", ["oneshot", "service", "worker"]),
        ("register web --restart on", ["on-failure"]),
        ("exec --strategy least", ["least_loaded"]),
        ("exec -s c", ["capability", "consistent_hash"]),
        ("top --sort r", ["rps", "rss"]),
        ("completion ", ["bash", "fish", "zsh"]),
        ("status --type ", ["http", "onnx"]),
        ("list --label tier=g", ["tier=gold"]),
        ("exec --type h", ["http"]),
        ("exec --engine w", ["web", "worker"]),
        ("exec --instance web", ["web#0", "web#1"]),
        ("stop w", ["web", "web#0", "web#1", "worker", "worker#0"]),
        ("restart web web#", ["web#0", "web#1"]),
        ("logs d", ["db", "db#0"]),
        ("scale ", ["db", "web", "worker"]),
        ("scale web ", []),  # a number
        ("unregister web ", ["db", "web", "worker"]),
        ("events -e ", ["db", "web", "worker"]),
        ("register ", []),  # a new engine's name
        ("stop --no", ["--no-dependents", "--no-wait"]),
        ("exec --strategy=cons", ["--strategy=consistent_hash"]),
        ("exec --strategy = cap", ["capability"]),  # bash splits at the `=`
        ("exec --strategy =", list(sorted(TABLE["commands"]["exec"]["options"]["--strategy"]
                                         .removeprefix("choice:").split(",")))),
        ("exec --type http -- w", []),  # the payload
        ("exec --json --t", ["--timeout", "--type"]),
        ("--v", ["--version"]),
        ("stop --json web#0 w", ["web", "web#0", "web#1", "worker", "worker#0"]),
    ],
)  # fmt: skip
def test_completion_of_each_position(line: str, expected: list[str]) -> None:
    """Commands, options, option values (choices and the daemon's names) and arguments."""
    assert done(line) == expected


def test_nothing_from_a_daemon_that_does_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a daemon the names are empty (no connection is even tried), and commands and
    choices still complete."""
    monkeypatch.setenv("ENGCTL_HOME", "/nonexistent/engctl-home")
    monkeypatch.setattr(complete, "_cache", None)
    assert complete.candidates(["stop", "w"], complete._daemon_names) == []
    assert complete.candidates(["top", "--sort", "c"], complete._daemon_names) == ["cpu"]


def test_the_table_is_current() -> None:
    """completion_table.py is what `python -m engctl.cli.complete` generates from the typer
    app now: a new command or option is completed once the table is regenerated."""
    from pathlib import Path

    path = Path(complete.__file__).with_name("completion_table.py")
    assert path.read_text() == complete.render_table(), "regenerate: python -m engctl.cli.complete"
