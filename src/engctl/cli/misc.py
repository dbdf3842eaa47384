"""`engctl completion` and `engctl config`."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from typing import Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, emit_json, out


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
    """Show where engctl keeps its files and the daemon settings in effect (from config.toml)."""
    from dataclasses import asdict

    from engctl.config import DaemonConfig
    from engctl.paths import resolve_paths
    from engctl.policy_config import overrides_to_toml

    paths = resolve_paths()
    loaded = DaemonConfig.load(paths.config_file)
    settings = asdict(loaded)
    settings["policy"] = overrides_to_toml(loaded.policy)  # as written in [daemon.policy]
    info = {
        "home": os.environ.get("ENGCTL_HOME"),
        "socket": str(paths.socket),
        "state_dir": str(paths.state_dir),
        "log_dir": str(paths.log_dir),
        "config_file": str(paths.config_file),
        "config_file_exists": paths.config_file.exists(),
        "daemon": settings,
    }
    if json:
        emit_json(info)
        return
    for key in ("home", "socket", "state_dir", "log_dir", "config_file"):
        out(f"{key:12} {info[key] or '-'}")
    out("[daemon]")
    for key, value in settings.items():
        if key != "policy":
            out(f"  {key} = {value}")
    for key, value in settings["policy"].items():
        if isinstance(value, dict):
            for sub, v in value.items():
                out(f"  policy.{key}.{sub} = {v}")
        else:
            out(f"  policy.{key} = {value}")
    out("(`engctl policy show` lists every policy setting in effect per engine)")
