"""The `engctl` command. `main()` is the CLI's error boundary: every failure becomes one line
on stderr (a JSON object with `--json`) and a documented exit code (see `engctl.errors`).

Never imports `engctl.daemon`; heavy modules (rich, the client) load inside the commands.
The rule holds for every module of `engctl.cli` (`tests/unit/test_layering.py` checks it).
"""

from __future__ import annotations

import json
import os
import sys

from engctl.errors import (
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    INVALID_PARAMS,
    EngctlError,
)


def _report(code: int, message: str, rpc_code: int, json_mode: bool) -> int:
    if json_mode:
        sys.stderr.write(json.dumps({"error": {"code": rpc_code, "message": message}}) + "\n")
    else:
        sys.stderr.write(f"engctl: error: {message}\n")
    return code


def _quiet_library_warnings() -> None:
    """A library's warning (platformdirs' RuntimeDirWarning, a deprecation) never reaches the
    user; `python -W` and PYTHONWARNINGS still decide when given.

    Through `_warnings` (built in): importing `warnings` costs 0.3 ms of every start. No
    warning has been issued yet, so there is no registry to invalidate.
    """
    if not sys.warnoptions:
        import _warnings

        _warnings.filters.insert(0, ("ignore", None, Warning, None, 0))


def main(argv: list[str] | None = None) -> None:
    """Run the CLI and exit with its code."""
    _quiet_library_warnings()
    args = sys.argv[1:] if argv is None else argv
    json_mode = "--json" in args
    try:
        code = _run(args)
        sys.stdout.flush()  # inside the boundary: a closed pipe shows up here too
    except EngctlError as exc:
        code = _report(exc.exit_code, exc.message, exc.rpc_code, json_mode)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`engctl events | head -1`): stop quietly, as a command ended
        # by SIGPIPE does. What is still buffered goes nowhere, so exiting cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)


def _run(args: list[str]) -> int:
    from engctl.cli.fast import fast_command

    fast = fast_command(args)
    if fast is not None:
        return fast()

    from typer import Abort
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
    from typer._click.utils import PacifyFlushWrapper

    from engctl.cli.app import app, load_commands

    load_commands(args)
    try:
        rv = app(args=args, prog_name="engctl", standalone_mode=False)
    except SystemExit:
        # typer ends a broken pipe with exit 1, after wrapping stdout: make it ours (141).
        if isinstance(sys.stdout, PacifyFlushWrapper):
            raise BrokenPipeError from None
        raise
    except NoArgsIsHelpError as exc:
        sys.stdout.write(exc.format_message() + "\n")
        return 0
    except ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        return _report(
            exc.exit_code if exc.exit_code else EXIT_USAGE,
            # One line: click lays some messages out over several ("Choose from:\n\tbash,").
            " ".join(exc.format_message().split()) + hint,
            INVALID_PARAMS,
            "--json" in args,
        )
    except Abort:
        return EXIT_INTERRUPTED
    return rv if isinstance(rv, int) else 0
