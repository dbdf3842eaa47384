"""`engctl lease acquire|renew|release|list`: exclusive use of one idle instance for a while
(docs/elastic.md#leases); `engctl exec --lease L-…` runs requests there."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, emit_json, out

if TYPE_CHECKING:
    from engctl.documents import LeaseDoc

lease_app = typer.Typer(
    help="Leases: hold one idle instance for yourself for a while.", no_args_is_help=True
)
app.add_typer(lease_app, name="lease")

LeaseArg = Annotated[str, typer.Argument(help="The lease id (L-…), as acquire printed it.")]
TtlOpt = Annotated[
    str | None,
    typer.Option(
        "--ttl", help="Hold it this long without a renewal, e.g. 30s, 5m (capped by the daemon)."
    ),
]


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _granted(result: dict[str, Any], json: bool) -> None:
    """Print an acquired or renewed lease; say so on stderr when its ttl was capped."""
    asked = result.get("ttl_asked")
    if isinstance(asked, int | float) and asked > result["ttl"]:
        sys.stderr.write(
            f"engctl: warning: ttl {asked:g}s capped to {result['ttl']:g}s"
            " (max_lease_ttl in config.toml)\n"
        )
    if json:
        emit_json(result)
        return
    out(
        f"{result['lease']}  {result['instance']}  expires {_clock(result['expires_at'])}"
        f" (ttl {result['ttl']:g}s)"
    )


@lease_app.command("acquire")
def acquire(
    type_: Annotated[str | None, typer.Option("--type", "-t", help="Engine type.")] = None,
    engine: Annotated[str | None, typer.Option("--engine", "-e", help="This engine only.")] = None,
    instance: Annotated[
        str | None, typer.Option("--instance", "-i", help="This instance only (NAME#K).")
    ] = None,
    cap: Annotated[
        list[str], typer.Option("--cap", help="Required capability (repeatable).")
    ] = [],  # noqa: B006
    label: Annotated[
        list[str], typer.Option("--label", help="Required label KEY=VALUE (repeatable).")
    ] = [],  # noqa: B006
    ttl: TtlOpt = None,
    holder: Annotated[
        str | None, typer.Option("--holder", help="Who holds it (shown by status and list).")
    ] = None,
    wait: Annotated[
        str | None,
        typer.Option("--wait", help="Wait this long for an idle instance, e.g. 10s (default: 0)."),
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Lease an idle ready instance: no other request goes to it until the lease ends.

    When none is idle, an autoscaled engine that may grow starts one for the lease; else the
    command waits up to --wait. The lease ends when released, when not renewed within its ttl
    (default 60s), when its instance stops, and with the daemon. Prints the lease id, the
    instance and when the lease expires.
    """
    from engctl.timespec import parse_duration

    for text in label:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip():
            from engctl.errors import UsageError

            raise UsageError(f"--label expects KEY=VALUE, got {text!r}")
    result = client(autostart=True).lease_acquire(
        ttl=None if ttl is None else parse_duration(ttl, "--ttl"),
        holder=holder,
        wait=None if wait is None else parse_duration(wait, "--wait"),
        type=type_,
        engine=engine,
        instance=instance,
        require=cap,
        labels=label,
    )
    _granted(dict(result), json)


@lease_app.command("renew")
def renew(lease: LeaseArg, ttl: TtlOpt = None, json: JsonFlag = False) -> None:
    """Hold a lease for its ttl (or --ttl) more, from now. An ended lease cannot be renewed."""
    from engctl.timespec import parse_duration

    seconds = None if ttl is None else parse_duration(ttl, "--ttl")
    _granted(dict(client().lease_renew(lease, seconds)), json)


@lease_app.command("release")
def release(lease: LeaseArg, json: JsonFlag = False) -> None:
    """Give a leased instance back to the pool."""
    result = client().lease_release(lease)
    if json:
        emit_json(result)
        return
    out(f"released {result['released']} ({result['instance']})")


@lease_app.command("list")
def list_leases(json: JsonFlag = False) -> None:
    """Every lease held: its id, instance, holder and when it expires."""
    leases: list[LeaseDoc] = client().leases()
    if json:
        emit_json({"leases": leases})
        return
    if not leases:
        out("no leases held")
        return
    rows = [("LEASE", "INSTANCE", "HOLDER", "EXPIRES", "TTL")]
    rows += [
        (
            lease["lease"],
            lease["instance"],
            lease["holder"] or "-",
            _clock(lease["expires_at"]),
            f"{lease['ttl']:g}s",
        )
        for lease in leases
    ]
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for row in rows:
        out("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
