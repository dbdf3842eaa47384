"""Every command of the CLI, enumerated from the typer app (so a new command is covered
without a change here), run with bad input: an unknown flag, bad option values, a missing
argument, an unknown engine, bad files. Each must fail with one line on stderr and a
documented exit code, never a Python traceback (issue 10.15)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PY, Home, engine_cmd

# Documented exit codes of a failure (src/engctl/errors.py, docs/cli.md "Exit codes").
FAILURE_CODES = {1, 2, 3, 4, 5, 6, 7}
# Commands whose valid parse would stop, replace or outlive the daemon under test: only
# values that fail to parse are given to them.
PARSE_ONLY = {("daemon", "stop"), ("daemon", "start"), ("daemon", "run"), ("demo",)}
# Commands whose --type is a filter: an unknown type is valid input that matches nothing.
TYPE_FILTERS = {("list",), ("status",)}


def _commands(groups: bool = False) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, click command) of every leaf command of the typer app (and of every group,
    the root included, with `groups`)."""
    from typer.main import get_command

    from engctl.cli.app import app, load_commands

    load_commands([])

    def walk(cmd: Any, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
        if hasattr(cmd, "commands"):
            if groups:
                yield path, cmd
            for name, sub in cmd.commands.items():
                yield from walk(sub, (*path, name))
        else:
            yield path, cmd

    yield from walk(get_command(app), ())


def _bad_values(param: Any) -> list[str]:
    kind = getattr(param.type, "name", str(param.type))
    if "int" in kind:
        return ["abc", "-5"]
    if "float" in kind:
        return ["abc", "nan", "inf", "-1"]
    if kind == "choice":
        return ["bogus"]
    if kind == "path":
        return ["/nonexistent/folder/x.toml"]
    if param.name in ("mode", "restart", "sort", "since", "type_"):
        return ["bogus"]
    return []


def _filler(param: Any) -> list[str]:
    """A valid value for a required argument, so that the bad one is what is judged."""
    kind = getattr(param.type, "name", "")
    if param.name == "shell":
        return ["bash"]
    if "int" in kind:
        return ["1"]
    return ["e"]


def _cases(bad_files: dict[str, str]) -> list[list[str]]:
    cases: list[list[str]] = []
    for path, cmd in _commands():
        base = list(path)
        if path == ("exec",):
            cases += [
                ["exec", "--no-such-flag"],
                ["exec"],
                ["exec", "--timeout", "nan", "--", "1"],
                ["exec", "--timeout", "inf", "--", "1"],
                ["exec", "--retries", "-1", "--", "1"],
                ["exec", "--retries", "1e999", "--", "1"],
                ["exec", "--engine", "nosuch", "--", "1"],
                ["exec", "--instance", "e#99", "--", "1"],
                ["exec", "--type", "echo", "--", '"\\ud800"'],
                ["exec", "--type", "echo", "--", "[" * 100_000],
            ]
            continue
        args = [p for p in cmd.params if p.param_type_name == "argument"]
        opts = [p for p in cmd.params if p.param_type_name == "option"]
        required = [v for p in args if p.required for v in _filler(p)]
        cases.append([*base, *required, "--no-such-flag"])
        for opt in opts:
            for value in _bad_values(opt):
                if path in TYPE_FILTERS and opt.name == "type_":
                    continue
                if path in PARSE_ONLY and value not in ("abc", "-5", "bogus"):
                    continue
                if path == ("daemon", "run") and value == "-5":
                    cases.append([*base, opt.opts[0], "70000"])
                cases.append([*base, *required, opt.opts[0], value])
        if path in PARSE_ONLY:
            continue
        if any(p.required for p in args):
            cases.append(base)  # a missing argument
        for arg in args:
            if arg.name in ("names", "targets", "name", "target"):
                rest = [v for p in args if p is not arg and p.required for v in _filler(p)]
                for ref in ("nosuch", "nosuch#0", "e#99", "e#x"):
                    cases.append([*base, ref, *rest])
        for opt in opts:
            if opt.name == "file":
                for bad in bad_files.values():
                    cases.append([*base, opt.opts[0], bad])
    cases.append(["register", "x", "--cmd", 'unterminated "quote'])
    cases.append(["register", "x", "--cmd", "true", "--env", "=v"])
    cases.append(["logs", "e", "-n", "-1"])
    return cases


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, str]:
    files = {
        "missing": tmp_path / "missing.toml",
        "folder": tmp_path,
        "not-utf8": tmp_path / "latin1.toml",
        "deep": tmp_path / "deep.toml",
        "not-toml": tmp_path / "garbage.toml",
        "unknown-key": tmp_path / "unknown.toml",
    }
    files["not-utf8"].write_bytes(b'[engines.a]\ncommand = ["caf\xe9"]\n')
    files["deep"].write_text('[engines.a]\ncommand = ["x"]\nx = ' + "[" * 5000 + "]" * 5000)
    files["not-toml"].write_bytes(b"\x00\x01 = = [[\n")
    files["unknown-key"].write_text('[engines.a]\ncommand = ["x"]\nbogus = 1\n')
    return {k: str(v) for k, v in files.items()}


def _run(home: Home, args: list[str]) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    r = subprocess.run(
        [PY, "-m", "engctl", *args],
        env=home.env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    return args, r


SHARDS = 4  # the cases in 4 parts, each with its own daemon: parallel under pytest-xdist


@pytest.mark.parametrize("shard", range(SHARDS))
def test_every_command_fails_cleanly_on_bad_input(
    daemon: Home, bad_files: dict[str, str], shard: int
) -> None:
    """Bad input to any command gives a documented exit code and one line on stderr (a
    command's own usage text aside), never a traceback."""
    with daemon.client() as c:
        c.register({"e": {"command": engine_cmd("echo.py"), "type": "echo"}})
    every = _cases(bad_files)
    assert len(every) > 100
    cases = every[shard::SHARDS]
    bad = []
    with concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as pool:
        for args, r in pool.map(lambda a: _run(daemon, a), cases):
            if "Traceback" in r.stderr or r.returncode not in FAILURE_CODES:
                bad.append(f"engctl {' '.join(args)[:80]}: exit {r.returncode}: {r.stderr[-300:]}")
            elif len(r.stderr.strip().splitlines()) != 1:
                bad.append(f"engctl {' '.join(args)[:80]}: stderr is not one line: {r.stderr}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    ("args", "stdin", "code", "message"),
    [
        (["register", "x", "--cmd", 'unterminated "quote'], b"", 2, "No closing quotation"),
        (["export", "-o", "/nonexistent/x.toml"], b"", 2, "cannot write /nonexistent/x.toml"),
        (["register", "-f", "-"], b'[engines.a]\ncommand = ["caf\xe9"]\n', 2,
         "<stdin>: not UTF-8 text: byte 0xe9 at line 2, column 16"),
        (["register", "-f", "-"], b"[engines.a]\nx = " + b"[" * 5000, 2, "nested too deeply"),
        (["exec", "--type", "echo", "-"], b"\xff\xfe\x00", 2, "stdin is not UTF-8 text"),
        (["exec", "--type", "echo", "-"], b"[" * 100_000, 2, "nests too deeply"),
        (["exec", "--type", "echo", "-"], b"[" * 990 + b"]" * 990, 2, "nests too deeply"),
        (["exec", "--type", "echo", "--timeout", "nan", "--", "1"], b"", 2, "finite number"),
        (["exec", "--type", "echo", "--", '"\\udc80"'], b"", 2, "lone surrogate"),
        (["status", "--watch", "--interval", "nan"], b"", 2, "finite number"),
    ],
    ids=["cmd-quote", "export-folder", "file-not-utf8", "file-deep", "exec-binary-stdin",
         "exec-deep", "exec-deep-valid", "exec-timeout-nan", "exec-surrogate", "watch-nan"],
)  # fmt: skip
def test_bad_input_is_one_line_that_says_what_is_wrong(
    daemon: Home, args: list[str], stdin: bytes, code: int, message: str
) -> None:
    """The inputs that printed tracebacks (issues 9.12 and 10.15) now fail with one line
    naming the problem, and a usage exit code."""
    with daemon.client() as c:
        c.register({"e": {"command": engine_cmd("echo.py"), "type": "echo"}})
    r = subprocess.run(
        [PY, "-m", "engctl", *args], env=daemon.env, input=stdin, capture_output=True, timeout=30
    )
    err = r.stderr.decode()
    assert r.returncode == code, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_daemon_run_on_a_busy_metrics_port_fails_in_one_line_and_leaves_no_socket(
    home: Home,
) -> None:
    """`daemon run --metrics-port` on a port in use: one line, exit 3, and no socket left
    behind (the port is bound before the socket exists)."""
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = home.cli("daemon", "run", "--metrics-port", str(port), timeout=30)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip() == (
        f"engctl daemon: cannot serve metrics on 127.0.0.1:{port}: address already in use"
        " (choose another --metrics-port, or metrics_port in config.toml)"
    )
    assert not home.paths.socket.exists()
    assert home.cli("daemon", "start").returncode == 0  # a daemon starts as usual after it
    assert home.cli("status", "--json").returncode == 0
