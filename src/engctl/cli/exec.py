"""`engctl exec`: send requests to the best engine instance.

Parsed with argparse and run without typer: `exec` is called from scripts and loops, and its
start-up must cost about what `engctl --version` does. typer lists it in `engctl --help` only.

Payload: the argument after `--` (or `-` for stdin). Text that parses as JSON is sent as that
JSON value; other text is sent as a JSON string, unless `--json-input` asks to refuse it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

from engctl.errors import EXIT_FAILED, UsageError

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from typing import Any, NoReturn

STRATEGIES = (
    "round_robin",
    "weighted_round_robin",
    "least_loaded",
    "weighted_random",
    "capability",
    "affinity",
    "consistent_hash",
)

HELP = "Send a request to the best engine instance and print its result."
EPILOG = """\
payload: after `--`, or `-` to read it from stdin. Text that is valid JSON is sent as that
value; other text is sent as a JSON string (refused with --json-input).

output: the result (strings as text, anything else as compact JSON); with --json the result
object {"request_id", "engine", "instance", "ok", "result", "latency_ms", "attempts"}.
--batch reads one payload per input line and writes one result object per line, in input
order, with -j requests in flight; a failed request is an object with "ok": false and
"error": {"code", "message"}, and the exit code is then 1.

exit codes: 0 ok, 1 request failed, 2 usage, 3 daemon unreachable, 4 no eligible engine,
5 timeout, 6 busy (queue full).

examples:
  engctl exec --type onnx -- '{"x": [1, 2, 3]}'
  echo '{"x": 1}' | engctl exec --type onnx -
  engctl exec --type kv --strategy consistent_hash --key user-42 -- '{"get": "a"}'
  engctl exec --type onnx --batch -j 16 < requests.ndjson > results.ndjson
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    # argparse's default asks shutil for the width, which imports shutil (and bz2, lzma) on
    # every run, help or not; os knows the terminal width too.
    def __init__(self, prog: str) -> None:
        try:
            width = os.get_terminal_size().columns - 2
        except OSError:
            width = 78
        super().__init__(prog, width=max(40, width))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `engctl exec --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The one parser of `engctl exec`."""
    p = _Parser(
        prog="engctl exec",
        description=HELP,
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("payload", nargs="?", help="the request input (JSON or text), or - for stdin")
    f = p.add_argument_group("selection")
    f.add_argument("--type", "-t", help="engine type")
    f.add_argument("--engine", "-e", help="this engine only")
    f.add_argument("--instance", "-i", help="this instance only (NAME#K)")
    f.add_argument("--cap", action="append", default=[], help="required capability (repeatable)")
    f.add_argument(
        "--prefer", action="append", default=[], help="preferred capability (repeatable)"
    )
    f.add_argument("--label", action="append", default=[], help="KEY=VALUE (repeatable)")
    f.add_argument("--strategy", "-s", choices=STRATEGIES, help="selection strategy")
    f.add_argument("--key", "-k", help="stickiness key (affinity, consistent_hash)")
    r = p.add_argument_group("request")
    r.add_argument("--timeout", type=float, help="seconds (default: daemon default_timeout)")
    r.add_argument(
        "--retries", type=int, default=0, help="retry a failed request on other instances"
    )
    r.add_argument("--json-input", action="store_true", help="refuse payloads that are not JSON")
    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print the result object")
    o.add_argument("--explain", action="store_true", help="show every candidate and the choice")
    o.add_argument("--batch", action="store_true", help="one payload per stdin line (NDJSON)")
    o.add_argument("-j", "--jobs", type=int, default=8, help="requests in flight with --batch")
    return p


def parse_payload(text: str, json_input: bool) -> Any:
    """The value to send for a payload text (see the module doc)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        if json_input:
            raise UsageError(
                f"payload is not valid JSON ({exc}); drop --json-input to send text"
            ) from None
        return text.removesuffix("\n") if text.endswith("\n") else text


def main(args: list[str]) -> int:
    """Run `engctl exec ARGS`; returns the exit code (errors raise EngctlError)."""
    opts = build_parser().parse_args(args)
    if opts.retries < 0:
        raise UsageError("--retries must be 0 or more")
    if opts.timeout is not None and opts.timeout <= 0:
        raise UsageError("--timeout must be positive")
    if opts.strategy in ("affinity", "consistent_hash") and not opts.key:
        raise UsageError(f"--strategy {opts.strategy} needs --key (the stickiness key)")
    for label in opts.label:
        if "=" not in label or label.startswith("="):
            raise UsageError(f"--label expects KEY=VALUE, got {label!r}")
    filters: dict[str, Any] = {
        "type": opts.type,
        "engine": opts.engine,
        "instance": opts.instance,
        "require": opts.cap,
        "prefer": opts.prefer,
        "labels": opts.label,
        "key": opts.key,
        "strategy": opts.strategy,
        "timeout": opts.timeout,
        "retries": opts.retries,
    }
    from engctl.client import Client

    if opts.batch:
        if opts.payload not in (None, "-"):
            raise UsageError("--batch reads payloads from stdin; give no payload argument")
        if opts.jobs < 1:
            raise UsageError("-j must be at least 1")
        failed = False
        with Client() as c:
            for obj in c.exec_many(_lines(opts.json_input), window=opts.jobs, **filters):
                failed = failed or not obj["ok"]
                sys.stdout.write(json.dumps(obj) + "\n")
                sys.stdout.flush()
        return EXIT_FAILED if failed else 0
    if opts.payload is None:
        raise UsageError("give a payload after `--`, or - to read it from stdin")
    text = sys.stdin.read() if opts.payload == "-" else opts.payload
    value = parse_payload(text, opts.json_input)
    with Client() as c:
        try:
            obj = c.exec(value, explain=opts.explain, **filters)
        except UsageError:
            raise
        except Exception as exc:
            data = getattr(exc, "data", {}) or {}
            if opts.explain and isinstance(data.get("explain"), dict):
                _print_explain(data["explain"])
            raise
    if opts.explain and "explain" in obj:
        _print_explain(obj["explain"])
    if opts.json:
        sys.stdout.write(json.dumps(obj) + "\n")
    else:
        result = obj.get("result")
        sys.stdout.write((result if isinstance(result, str) else json.dumps(result)) + "\n")
    return 0


def _lines(json_input: bool) -> Iterator[Any]:
    """Payloads from stdin, one per non-empty line, read as they are consumed."""
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            yield parse_payload(line, json_input)
        except UsageError as exc:
            raise UsageError(f"stdin line {n}: {exc.message}") from exc


def _print_explain(explain: dict[str, Any]) -> None:
    """The --explain report: each candidate with its factors or what excluded it, then why."""
    out = sys.stdout
    out.write(f"strategy {explain.get('strategy')}: {explain.get('outcome')}\n")
    winner = explain.get("winner")
    for item in explain.get("candidates", []):
        mark = "*" if item.get("instance") == winner else " "
        if item.get("excluded_by"):
            detail = f"excluded by {item['excluded_by']}: {item.get('note', '')}"
        else:
            factors = " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in (item.get("factors") or {}).items()
            )
            detail = " ".join(p for p in (factors, item.get("note") or "") if p)
        out.write(f" {mark} {item.get('instance')}  {detail}\n")
    out.write(f"decision: {explain.get('reason')}\n")
