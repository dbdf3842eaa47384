"""`engctl completion` and `engctl config`."""

from __future__ import annotations

import sys
from enum import StrEnum
from typing import Annotated, Any

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, emit_json


class Shell(StrEnum):
    bash = "bash"
    zsh = "zsh"
    fish = "fish"


def completion_script(shell: str) -> str:
    """The completion script for `shell` (the same text as in completions/)."""
    from engctl.cli.complete import SCRIPTS

    return SCRIPTS[shell]


@app.command()
def completion(shell: Annotated[Shell, typer.Argument(help="bash, zsh or fish.")]) -> None:
    """Print a shell completion script (bash, zsh or fish).

    It completes commands, options, option values (--mode, --strategy, --sort, --type, …)
    and engine and instance names, asking the daemon only if it runs (never starting one).

    For example: engctl completion bash > ~/.local/share/bash-completion/completions/engctl
    """
    sys.stdout.write(completion_script(shell.value))


@app.command()
def config(json: JsonFlag = False) -> None:
    """Show where engctl keeps its files and the daemon settings in effect, as valid TOML.

    With a daemon running: the settings it runs with (asked over its socket), each one that
    config.toml changes marked with a comment (`engctl daemon reload` applies it, or a
    restart). With none: what config.toml gives (the defaults where it says nothing).
    """
    from engctl.config import DaemonConfig, config_table, rules_tables
    from engctl.errors import DaemonNotRunningError, SpecError
    from engctl.paths import resolve_paths

    paths = resolve_paths()
    file_error = None
    in_file: dict[str, Any] | None = None
    rules: dict[str, Any] = {"alerts": {}, "hooks": {}}
    try:
        loaded = DaemonConfig.load(paths.config_file)
        in_file, rules = config_table(loaded), rules_tables(loaded)
    except SpecError as exc:
        file_error = exc.message
    running: dict[str, Any] | None = None
    pid = None
    restart_needed: list[str] = []
    try:
        with client() as c:
            answer = c.call("daemon.config")
        running, pid = answer["settings"], answer["pid"]
        rules = {k: answer.get(k, {}) for k in ("alerts", "hooks")}
        restart_needed = answer.get("restart_needed", [])
    except DaemonNotRunningError:
        if in_file is None:
            assert file_error is not None
            raise SpecError(file_error) from None  # nothing runs and the file is broken
    settings = running if running is not None else in_file
    assert settings is not None
    differs = _differences(in_file, running) if in_file is not None and running else {}
    info = {
        "home": paths.home,
        "socket": str(paths.socket),
        "state_dir": str(paths.state_dir),
        "log_dir": str(paths.log_dir),
        "config_file": str(paths.config_file),
        "config_file_exists": paths.config_file.exists(),
        "source": "daemon" if running is not None else "file",
        "daemon_pid": pid,
        "daemon": settings,
        "alerts": rules["alerts"],
        "hooks": rules["hooks"],
        "file_differs": {k: v for k, (_, v) in sorted(differs.items())},
        "file_error": file_error,
        "restart_needed": restart_needed,
    }
    if json:
        emit_json(info)
        return
    sys.stdout.write(_config_text(info, differs))


Flat = dict[str, Any]


def _flatten(table: dict[str, Any], prefix: str = "") -> Flat:
    out: Flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _differences(in_file: dict[str, Any], running: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted setting -> (running value, config.toml's value), where the two differ (None for
    a value one side does not set)."""
    a, b = _flatten(running), _flatten(in_file)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _config_text(info: dict[str, Any], differs: dict[str, tuple[Any, Any]]) -> str:
    """The settings as a config.toml (valid TOML), folders and differences as comments."""
    import tomli_w

    from engctl.config import RESTART_SETTINGS

    lines = [f"# {key:12} {info[key] or '-'}" for key in ("home", "socket", "state_dir", "log_dir")]
    exists = "" if info["config_file_exists"] else " (no such file: the defaults apply)"
    lines.append(f"# {'config_file':12} {info['config_file']}{exists}")
    if info["source"] == "daemon":
        lines.append(f"# The settings the daemon (pid {info['daemon_pid']}) runs with.")
    else:
        lines.append("# No daemon is running: the settings config.toml gives.")
    if info["file_error"]:
        lines.append(f"# config.toml has an error, nothing of it applies: {info['file_error']}")
    table = tomli_w.dumps({"daemon": info["daemon"]}).splitlines()
    section = ""
    for line in table:
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].removeprefix("daemon").removeprefix(".")
            section = f"{section}." if section else ""
        elif " = " in line:
            key = section + line.split(" = ", 1)[0]
            if key in differs:
                line += _file_says(differs[key][1], key.split(".")[0] in RESTART_SETTINGS)
        lines.append(line)
    if info["alerts"] or info["hooks"]:
        lines.append("")
        tables = {k: info[k] for k in ("alerts", "hooks") if info[k]}
        lines += tomli_w.dumps(tables).splitlines()
    only_in_file = [k for k, (now, _) in differs.items() if now is None]
    if only_in_file:
        lines.append("")
        lines.append("# config.toml also sets (not in effect until `engctl daemon reload`):")
        lines += [f"#   {k} = {_toml_value(differs[k][1])}" for k in only_in_file]
    lines.append("# (`engctl policy show` lists every policy setting in effect per engine)")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    import tomli_w

    return tomli_w.dumps({"v": value})[4:].strip()


def _file_says(value: Any, restart: bool) -> str:
    if value is None:
        return "  # not in config.toml: the default applies after `engctl daemon reload`"
    text = _toml_value(value)
    how = "a daemon restart" if restart else "`engctl daemon reload`"
    return f"  # config.toml says {text}: {how} applies it"
