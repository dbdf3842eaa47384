"""The daemon's command line, `python -m engctl.daemon [options]`: what `engctl daemon start`
and `engctl daemon run` pass it. Read with `getopt`: argparse (with gettext) would stay loaded
for the daemon's whole life for five options, 0.36 MiB of its RSS.

Imports the stdlib only.
"""

from __future__ import annotations

import getopt
import sys
from dataclasses import dataclass

PROG = "python -m engctl.daemon"
USAGE = f"""usage: {PROG} [-h] [--home HOME] [--ready-fd FD] [--background]
       {" " * len(PROG)} [--metrics-port PORT] [--reset-registry]"""
HELP = f"""{USAGE}

The engctl daemon: `engctl daemon start` runs it in the background, `engctl daemon run` in
the foreground.

options:
  -h, --help           show this help and exit
  --home HOME          engctl home (default: ENGCTL_HOME or platformdirs)
  --ready-fd FD        write 'ok' or 'error: …' here when ready
  --background         log to the file only
  --metrics-port PORT  serve Prometheus /metrics on 127.0.0.1:PORT (0: off)
  --reset-registry     move registry.json aside (never deleted) and start with no engines
"""
_LONG = ["help", "home=", "ready-fd=", "background", "metrics-port=", "reset-registry"]


@dataclass(frozen=True)
class Options:
    """What the command line asked for."""

    home: str | None = None
    ready_fd: int | None = None
    background: bool = False
    metrics_port: int | None = None
    reset_registry: bool = False


def parse(argv: list[str]) -> Options:
    """The options in `argv`; `--help` prints the help and exits 0, anything else wrong prints
    the usage and one line and exits 2 (as argparse does)."""
    home: str | None = None
    ready_fd: int | None = None
    metrics_port: int | None = None
    background = reset_registry = False
    try:
        found, rest = getopt.getopt(argv, "h", _LONG)
        if rest:
            raise getopt.GetoptError(f"unrecognized arguments: {' '.join(rest)}")
        for name, value in found:
            if name in ("-h", "--help"):
                sys.stdout.write(HELP)
                sys.exit(0)
            elif name == "--home":
                home = value
            elif name == "--ready-fd":
                ready_fd = _integer(name, value)
            elif name == "--metrics-port":
                metrics_port = _integer(name, value)
            elif name == "--background":
                background = True
            else:  # --reset-registry, the one left in _LONG
                reset_registry = True
    except getopt.GetoptError as exc:
        sys.stderr.write(f"{USAGE}\n{PROG}: error: {exc.msg}\n")
        sys.exit(2)
    return Options(home, ready_fd, background, metrics_port, reset_registry)


def _integer(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise getopt.GetoptError(f"argument {name}: invalid int value: {value!r}") from None
