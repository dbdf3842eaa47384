"""Shell completion without typer: fast enough to run on every Tab (a budget of 100 ms).

The shells' scripts (`engctl completion SHELL`, shipped in completions/) call
`_ENGCTL_COMPLETE=SHELL engctl WORD…`, the words up to the one being completed. Commands,
options and their values come from `completion_table` (generated from the typer app by
`build_table`; a test keeps it current); engine, instance, type and label names come from the
daemon, asked only if it runs (never started for this) and within a short deadline.
Imports neither typer nor rich.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # typing is not imported at run time: it is on every Tab
if TYPE_CHECKING:
    from typing import Any

ENV = "_ENGCTL_COMPLETE"
SHELLS = ("bash", "zsh", "fish")
# How long the daemon may take to list the engines: a Tab must not hang on a busy daemon.
DAEMON_DEADLINE = 0.05

# Value kinds in the table: "flag" (no value), "value" (free text), "engines", "instances",
# "targets" (engines and instances), "types", "labels", "file", or "choice:a,b,c".
_FROM_DAEMON = ("engines", "instances", "targets", "types", "labels")


def main(words: list[str]) -> int:
    """Print the completions of the last of `words` (the ones after `engctl`), one a line."""
    out = candidates(words, _daemon_names)
    if out:
        sys.stdout.write("\n".join(out) + "\n")
    return 0


def candidates(words: list[str], names: Any) -> list[str]:
    """What may replace the last word; `names(kind)` lists engines, instances, types or
    labels (the daemon's; a test passes its own)."""
    from engctl.cli.completion_table import TABLE

    *done, current = words or [""]
    node: dict[str, Any] = TABLE
    expecting: str | None = None
    positional = 0
    after_dashes = False
    for word in done:
        if expecting is not None:
            if word != "=":  # bash splits `--opt=value` at the `=` into three words
                expecting = None
        elif after_dashes:
            positional += 1
        elif word == "--":
            after_dashes = True
        elif word.startswith("-") and word != "-":
            option, eq, _ = word.partition("=")
            kind = node.get("options", {}).get(option)
            if kind is not None and kind != "flag" and not eq:
                expecting = kind
        elif word in node.get("commands", {}):
            node = node["commands"][word]
            positional = 0
        else:
            positional += 1
    if expecting is not None:
        # Right after bash's `=` word the text to complete is empty (readline's own word).
        return _values(expecting, "" if current == "=" else current, names)
    if after_dashes:
        return []
    if current.startswith("-"):
        option, eq, value = current.partition("=")
        kind = node.get("options", {}).get(option)
        if eq and kind not in (None, "flag"):
            return [f"{option}={v}" for v in _values(kind, value, names)]
        return sorted(o for o in node.get("options", {}) if o.startswith(current))
    commands = node.get("commands")
    if commands:
        return sorted(c for c in commands if c.startswith(current))
    args: list[str] = node.get("args", [])
    if not args:
        return []
    return _values(args[min(positional, len(args) - 1)], current, names)


def _values(kind: str, prefix: str, names: Any) -> list[str]:
    if kind.startswith("choice:"):
        found = kind.removeprefix("choice:").split(",")
    elif kind == "targets":
        found = [*names("engines"), *names("instances")]
    elif kind in _FROM_DAEMON:
        found = names(kind)
    else:
        return []  # free text, numbers, files (the shell's own completion takes over)
    return sorted(v for v in dict.fromkeys(found) if v.startswith(prefix))


_cache: dict[str, list[str]] | None = None


def _daemon_names(kind: str) -> list[str]:
    """Names from a running daemon (one `engine.list`); none when it does not run or answer
    within the deadline."""
    global _cache
    if _cache is None:
        _cache = {k: [] for k in _FROM_DAEMON}
        from engctl.errors import EngctlError

        try:
            engines = _list_engines()
        except (EngctlError, OSError, ValueError):  # gone, too slow, or not ours: no names
            engines = []
        for e in engines:
            name = str(e.get("name", ""))
            _cache["engines"].append(name)
            _cache["types"].append(str(e.get("type", "")))
            _cache["instances"] += [f"{name}#{k}" for k in range(int(e.get("instances") or 0))]
            _cache["labels"] += [f"{k}={v}" for k, v in (e.get("labels") or {}).items()]
    return _cache.get(kind, [])


def _list_engines() -> list[dict[str, Any]]:
    from engctl.client import Client

    if not os.path.exists(Client(autostart=False).paths.socket_file):
        return []  # no daemon: not even a connection attempt
    with Client(autostart=False, timeout=DAEMON_DEADLINE) as c:
        result = c.call("engine.list")
    return list(result.get("engines", []))


# -- the shells' scripts ----------------------------------------------------------------------
# Each hands engctl the words up to the cursor and falls back to file names when it has
# nothing (for -f FILE, and as bash's `-o default` does).
SCRIPTS = {
    "bash": """\
# bash completion for engctl (`engctl completion bash`): engctl answers itself, without
# typer, with engine and instance names from its daemon when one runs (it never starts one).
_engctl_completion() {
    local IFS=$'\\n'
    COMPREPLY=( $(_ENGCTL_COMPLETE=bash "$1" "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null) )
    return 0
}

complete -o default -F _engctl_completion engctl
""",
    "zsh": """\
#compdef engctl
# zsh completion for engctl (`engctl completion zsh`): engctl answers itself, without
# typer, with engine and instance names from its daemon when one runs (it never starts one).
_engctl_completion() {
    local -a found
    found=("${(@f)$(_ENGCTL_COMPLETE=zsh "${words[1]}" "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    found=(${found:#})
    if (( ${#found} )); then
        compadd -- "${found[@]}"
    else
        _files
    fi
}

compdef _engctl_completion engctl
""",
    "fish": """\
# fish completion for engctl (`engctl completion fish`): engctl answers itself, without
# typer, with engine and instance names from its daemon when one runs (it never starts one).
function __engctl_complete
    set -l tokens (commandline -opc)
    set -l current (commandline -ct)
    set -l found (env _ENGCTL_COMPLETE=fish $tokens[1] $tokens[2..-1] "$current" 2>/dev/null)
    if test (count $found) -gt 0
        printf '%s\\n' $found
    else
        __fish_complete_path "$current"
    end
end

complete --command engctl --no-files --arguments '(__engctl_complete)'
""",
}


# -- the table, from the typer app (at build time, never on a Tab) ---------------------------

# What the values of a parameter are, by its name; parameters not named here take free text.
_KINDS = {
    "targets": "targets",
    "target": "targets",
    "names": "engines",
    "name": "engines",
    "engine": "engines",
    "instance": "instances",
    "type": "types",
    "type_": "types",
    "label": "labels",
    "file": "file",
    "output": "file",
    "mode": "choice:oneshot,service,worker",
    "restart": "choice:always,never,on-failure",
}
# (command path, parameter): exceptions to _KINDS (`register NAME` names a new engine).
_EXCEPTIONS = {("register", "name"): "value"}


def build_table() -> dict[str, Any]:
    """The completion table of the typer app: commands, their options and arguments."""
    import typer.main

    from engctl.cli import exec as exec_cli
    from engctl.cli.app import app, load_commands
    from engctl.cli.top import SORT_KEYS
    from engctl.protocol import STRATEGIES

    load_commands([])
    kinds = {
        **_KINDS,
        "sort": "choice:" + ",".join(sorted(SORT_KEYS)),
        "strategy": "choice:" + ",".join(sorted(STRATEGIES)),
    }

    # typer's vendored click, read by duck typing (its classes are not a public API).
    def node(cmd: Any, path: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {"options": {}}
        for p in cmd.params:
            kind = _EXCEPTIONS.get((" ".join(path), p.name or ""))
            choices = getattr(p.type, "choices", None)
            if kind is None and choices:
                kind = "choice:" + ",".join(sorted(str(getattr(c, "value", c)) for c in choices))
            if kind is None:
                kind = kinds.get(p.name or "", "value")
            if p.param_type_name == "option":
                flag = getattr(p, "is_flag", False) or getattr(p, "count", False)
                for opt in [*p.opts, *p.secondary_opts]:
                    out["options"][opt] = "flag" if flag else kind
            else:
                out.setdefault("args", []).append(kind)
        out["options"].update({"-h": "flag", "--help": "flag"})
        if path == ("exec",):  # its own parser, not typer's
            out["options"] = {
                opt: "flag" if k == "flag" else kinds.get(dest, "value")
                for opt, (dest, k) in exec_cli._OPTIONS.items()
            }
        if hasattr(cmd, "commands"):
            out["commands"] = {
                name: node(sub, (*path, name)) for name, sub in sorted(cmd.commands.items())
            }
        return out

    return node(typer.main.get_command(app), ())


def render_table() -> str:
    """The text of `completion_table.py`."""
    from engctl.cli.generated import module_text

    return module_text(
        "Generated by `python -m engctl.cli.complete`: the commands, options and argument\n"
        "kinds of the typer app, for completion without typer. Do not edit; regenerate.",
        "TABLE",
        build_table(),
        preamble="# ruff: noqa: E501\n\n",
    )


if __name__ == "__main__":
    from engctl.cli.generated import write

    write(__file__, "completion_table.py", render_table())
