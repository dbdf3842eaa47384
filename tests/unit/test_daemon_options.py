"""The daemon's command line (`python -m engctl.daemon`), read with getopt."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engctl.daemon import options
from engctl.daemon.options import Options

_homes = st.text(st.characters(codec="utf-8", blacklist_characters="\0"), min_size=1)


@given(
    home=st.none() | _homes,
    ready_fd=st.none() | st.integers(0, 2**20),
    background=st.booleans(),
    metrics_port=st.none() | st.integers(0, 65535),
    reset_registry=st.booleans(),
    joined=st.booleans(),
)
def test_what_the_cli_passes_reads_back(
    home: str | None,
    ready_fd: int | None,
    background: bool,
    metrics_port: int | None,
    reset_registry: bool,
    joined: bool,
) -> None:
    """Every option, as `--name value` or `--name=value`, in any combination, reads back as
    given (a home that starts with dashes or holds '=' included)."""
    argv: list[str] = []

    def value(name: str, v: object) -> None:
        argv.extend([f"--{name}={v}"] if joined else [f"--{name}", str(v)])

    if home is not None:
        value("home", home)
    if ready_fd is not None:
        value("ready-fd", ready_fd)
    if background:
        argv.append("--background")
    if metrics_port is not None:
        value("metrics-port", metrics_port)
    if reset_registry:
        argv.append("--reset-registry")
    want = Options(home, ready_fd, background, metrics_port, reset_registry)
    assert options.parse(argv) == want


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["--bogus"], "option --bogus not recognized"),
        (["--ready-fd", "x"], "argument --ready-fd: invalid int value: 'x'"),
        (["--metrics-port=1.5"], "argument --metrics-port: invalid int value: '1.5'"),
        (["--home"], "option --home requires argument"),
        (["stray"], "unrecognized arguments: stray"),
        (["--background=yes"], "option --background must not have an argument"),
    ],
)
def test_a_wrong_command_line_is_the_usage_one_error_line_and_exit_2(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        options.parse(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: python -m engctl.daemon")
    assert err[-1] == f"python -m engctl.daemon: error: {error}"


def test_help_lists_every_option_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("-h", "--help"):
        with pytest.raises(SystemExit) as exc:
            options.parse(["--background", flag])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for name in ("--home", "--ready-fd", "--background", "--metrics-port", "--reset-registry"):
            assert name in out


def test_the_daemon_keeps_no_argparse() -> None:
    """Issue 13 (memory, regression): the daemon read its five options with argparse, which
    (with gettext) stayed loaded for its whole life: 0.36 MiB of its RSS."""
    code = (
        "import sys\n"
        "from engctl.daemon import main, options\n"
        "options.parse(['--background', '--home', '/tmp'])\n"
        "assert 'argparse' not in sys.modules, 'argparse loaded'\n"
        "assert 'shutil' not in sys.modules, 'shutil loaded'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
