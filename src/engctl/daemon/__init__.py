"""The engctl daemon: socket server, registry, supervision, monitoring.

Never imported by `engctl.cli`; it imports neither typer nor rich (its memory budget is tight).
"""

import sys


def allow_ssl() -> None:
    """Lift the daemon's block on importing ssl (see __main__): for what truly needs it, an
    https health check or prometheus-client, which then pays its ~8 MiB."""
    if "ssl" in sys.modules and sys.modules["ssl"] is None:
        del sys.modules["ssl"]
