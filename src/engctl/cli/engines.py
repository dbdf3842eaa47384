"""`engctl register|unregister|list|export|apply`: the registry of engines."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, emit_json, out, waiting, warn
from engctl.errors import RolloutFailedError, SpecError, UsageError

FileOpt = Annotated[
    str | None,
    typer.Option("--file", "-f", help=r"Engines file (TOML, \[engines.NAME] tables); - for stdin."),
]
RecreateOpt = Annotated[
    bool,
    typer.Option(
        "--recreate",
        help="A changed spec replaces every instance at once (drain, stop, start), not one by one.",
    ),
]
NoWaitOpt = Annotated[
    bool,
    typer.Option("--no-wait", help="Return once a rollout started, not when it ended."),
]


def read_engines_file(source: str) -> dict[str, dict[str, Any]]:
    """Parse and validate an engines file; errors name the file with line/column or field."""
    from engctl.config import decode_text, parse_toml
    from engctl.models import parse_engines_document

    if source == "-":
        data, label = sys.stdin.buffer.read(), "<stdin>"
    else:
        try:
            data, label = Path(source).read_bytes(), source
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror}") from exc
    doc = parse_toml(decode_text(data, label), label)
    try:
        parse_engines_document(doc)  # validate here for a message that names the file
    except SpecError as exc:
        raise SpecError(f"{label}: {exc.message}") from exc
    engines = doc.get("engines", {})
    if not engines:
        raise SpecError(f"{label}: no [engines.NAME] tables")
    return engines  # type: ignore[no-any-return]


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out_: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} expects KEY=VALUE, got {item!r}")
        out_[key] = value
    return out_


def _show_results(result: dict[str, Any], json: bool) -> None:
    """Print the result, then fail (exit 1) if a rollout it waited for failed."""
    if json:
        emit_json(result)
    else:
        _print_results(result)
    failed = [r for r in result["engines"] if (r.get("rollout") or {}).get("ok") is False]
    if failed:
        r = failed[0]
        raise RolloutFailedError(
            f"rollout of {r['name']} stopped: {r['rollout']['reason']} (the new spec is"
            " registered; the old processes keep serving: apply the old spec to roll back,"
            " or fix it and apply again)",
            {"rollout": r["rollout"]},
        )


def _print_results(result: dict[str, Any]) -> None:
    for r in result["engines"]:
        if r["action"] == "updated":
            out(f"updated {r['name']}: changed {', '.join(r['changed'])} ({r['detail']})")
        else:
            out(
                f"{r['action']} {r['name']}"
                + (f" ({r['detail']})" if r["action"] != "created" else "")
            )
    for name in result.get("removed", []):
        out(f"removed {name}")


# Ctrl-C of a waiting register/apply: the registration is the daemon's, so is its rollout.
_GOES_ON = (
    "what the daemon received is registered, and a rollout it needs goes on: `engctl status`"
    " shows it"
)


@app.command()
def register(
    name: Annotated[str | None, typer.Argument(help="Engine name (with --cmd).")] = None,
    file: FileOpt = None,
    cmd: Annotated[
        str | None, typer.Option("--cmd", help="Command line (split like a shell).")
    ] = None,
    type_: Annotated[
        str | None, typer.Option("--type", help="Engine type (dispatch filter).")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="worker, oneshot or service.")] = None,
    instances: Annotated[int | None, typer.Option(help="Number of instances.")] = None,
    max_concurrency: Annotated[
        int | None, typer.Option(help="Requests in flight per instance.")
    ] = None,
    cap: Annotated[list[str], typer.Option("--cap", help="A capability (repeatable).")] = [],  # noqa: B006
    label: Annotated[list[str], typer.Option("--label", help="KEY=VALUE (repeatable).")] = [],  # noqa: B006
    env: Annotated[list[str], typer.Option("--env", help="KEY=VALUE (repeatable).")] = [],  # noqa: B006
    weight: Annotated[float | None, typer.Option(help="Dispatch weight.")] = None,
    cwd: Annotated[str | None, typer.Option(help="Working folder.")] = None,
    shell: Annotated[bool, typer.Option("--shell", help="Run --cmd through /bin/sh -c.")] = False,
    restart: Annotated[str | None, typer.Option(help="always, on-failure or never.")] = None,
    no_start: Annotated[
        bool, typer.Option("--no-start", help="Register without starting.")
    ] = False,
    recreate: RecreateOpt = False,
    no_wait: NoWaitOpt = False,
    json: JsonFlag = False,
) -> None:
    """Register engines from a file (-f) or one from flags; a changed spec updates the engine."""
    if file is not None:
        if name or cmd:
            raise UsageError("give either -f FILE or NAME --cmd CMD, not both")
        engines = read_engines_file(file)
    else:
        if not name or not cmd:
            raise UsageError("give NAME and --cmd CMD, or -f FILE (see `engctl register --help`)")
        try:
            table: dict[str, Any] = {"command": cmd if shell else shlex.split(cmd)}
        except ValueError as exc:  # shlex: "No closing quotation", "No escaped character"
            raise UsageError(f"--cmd {cmd!r}: cannot split it like a shell: {exc}") from None
        for key, value in (
            ("type", type_),
            ("mode", mode),
            ("instances", instances),
            ("max_concurrency", max_concurrency),
            ("weight", weight),
            ("cwd", cwd),
        ):
            if value is not None:
                table[key] = value
        if shell:
            table["shell"] = True
        if cap:
            table["capabilities"] = cap
        if label:
            table["labels"] = _pairs(label, "--label")
        if env:
            table["env"] = _pairs(env, "--env")
        if restart:
            table["restart"] = {"policy": restart}
        from engctl.models import EngineSpec

        EngineSpec.from_dict(name, table, where=name)  # flag errors before any daemon start
        engines = {name: table}
    c = client(autostart=True)
    result = waiting(
        lambda: c.register(engines, start=not no_start, recreate=recreate, wait=not no_wait),
        _GOES_ON,
    )
    _show_results(result, json)


@app.command()
def unregister(
    names: Annotated[list[str], typer.Argument(help="Engine names.")], json: JsonFlag = False
) -> None:
    """Stop engines (whole process trees) and remove them from the registry."""
    result = client(autostart=True).unregister(names)
    if json:
        emit_json(result)
    else:
        out(f"unregistered: {', '.join(result['removed'])}")


@app.command("list")
def list_(
    names: Annotated[list[str] | None, typer.Argument(help="Engines (default: all).")] = None,
    type_: Annotated[str | None, typer.Option("--type", help="Only engines of this type.")] = None,
    label: Annotated[
        list[str],
        typer.Option("--label", help="Only engines with this label, KEY=VALUE (repeatable: all)."),
    ] = [],  # noqa: B006
    json: JsonFlag = False,
) -> None:
    """Registered engines: type, mode, instances, version, registration time, capabilities,
    labels and command (see `status` for processes)."""
    from engctl.cli.status import NO_ENGINES, _labels

    labels = _labels(label)
    c = client()
    result = c.call("engine.list", names=names or None, type=type_, labels=labels or None)
    if json:
        emit_json(result)
        return
    warn(c.daemon_info.get("warnings", []))
    if not result["engines"]:
        out("no engine matches" if names or type_ or labels else NO_ENGINES)
        return
    from engctl.cli.common import console
    from engctl.render.tables import engines_table

    console().print(engines_table(result["engines"]))


@app.command()
def export(
    names: Annotated[list[str] | None, typer.Argument(help="Engines (default: all).")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Print the registry as an engines file (TOML) that `apply -f` reads back."""
    result = client().call("engine.export", names=names or None)
    if json:
        emit_json(result)
        return
    import tomli_w

    text = tomli_w.dumps({"engines": result["engines"]})
    if output is None:
        sys.stdout.write(text)
    else:
        try:
            output.write_text(text)
        except OSError as exc:
            raise UsageError(f"cannot write {output}: {exc.strerror or exc}") from None
        out(f"wrote {len(result['engines'])} engines to {output}")


@app.command()
def apply(
    file: FileOpt = None,
    prune: Annotated[
        bool, typer.Option("--prune", help="Unregister engines that are not in the file.")
    ] = False,
    recreate: RecreateOpt = False,
    no_wait: NoWaitOpt = False,
    json: JsonFlag = False,
) -> None:
    """Make the registry match a file: create, update (a change that needs new processes rolls
    out one instance at a time, as `reload` does), --prune."""
    if file is None:
        raise UsageError("apply needs -f FILE (or -f - for stdin)")
    engines = read_engines_file(file)  # a bad file starts no daemon
    c = client(autostart=True)
    result = waiting(
        lambda: c.apply(engines, prune=prune, recreate=recreate, wait=not no_wait), _GOES_ON
    )
    _show_results(result, json)
