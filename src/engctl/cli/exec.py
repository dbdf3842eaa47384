"""`engctl exec`: send requests to the best engine instance.

Parsed here and run without typer: `exec` is called from scripts and loops, and its start-up
must cost about what `engctl --version` does. typer lists it in `engctl --help` only.

Payload: the argument after `--` (or `-` for stdin). Text that parses as JSON is sent as that
JSON value; other text is sent as a JSON string, unless `--json-input` asks to refuse it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

from engctl.errors import EXIT_FAILED, EngctlError, InvalidParamsError, UsageError
from engctl.protocol import STRATEGIES, number

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from typing import Any


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
5 timeout, 6 busy (queue full, or shed by an adaptive limit), 8 the --lease is not held
(expired, released, its instance gone, or granted before a daemon restart), 9 rate limited
(no token before the deadline).

examples:
  engctl exec --type onnx -- '{"x": [1, 2, 3]}'
  echo '{"x": 1}' | engctl exec --type onnx -
  engctl exec --type kv --strategy consistent_hash --key user-42 -- '{"get": "a"}'
  engctl exec --type onnx --batch -j 16 < requests.ndjson > results.ndjson
"""


USAGE = """\
usage: engctl exec [OPTIONS] [--] PAYLOAD|-
       engctl exec [OPTIONS] --batch [-j N] < payloads.ndjson

selection:
  -t, --type TYPE         engine type
  -e, --engine NAME       this engine only
  -i, --instance NAME#K   this instance only
  --cap CAP               required capability (repeatable)
  --prefer CAP            preferred capability, for --strategy capability (repeatable)
  --label KEY=VALUE       required label (repeatable)
  -s, --strategy NAME     round_robin, weighted_round_robin, least_loaded, weighted_random,
                          capability, affinity, consistent_hash (default: daemon config)
  -k, --key KEY           stickiness key (needed by affinity and consistent_hash)
  --lease L-…             run on the instance this lease holds (only there)

request:
  --timeout SECONDS       deadline (default: the daemon's default_timeout)
  --retries N             retry a failed request on other instances (default 0)
  --priority P            low, normal, high or 0-9; higher is served first (default normal)
  --caller NAME           who asks: fair share and [daemon.limits.callers] limits
  --json-input            refuse payloads that are not JSON

output:
  --json                  print the result object
  --explain               show every candidate, its factors and the decision
  --batch                 one payload per stdin line, one result object per output line
  -j, --jobs N            requests in flight with --batch (default 8)
  -h, --help              show this help
"""

# option -> (destination, kind): kind is str, int, float, "list" (repeatable) or "flag".
_OPTIONS: dict[str, tuple[str, object]] = {
    "--type": ("type", str),
    "-t": ("type", str),
    "--engine": ("engine", str),
    "-e": ("engine", str),
    "--instance": ("instance", str),
    "-i": ("instance", str),
    "--cap": ("cap", "list"),
    "--prefer": ("prefer", "list"),
    "--label": ("label", "list"),
    "--strategy": ("strategy", str),
    "-s": ("strategy", str),
    "--key": ("key", str),
    "-k": ("key", str),
    "--lease": ("lease", str),
    "--timeout": ("timeout", float),
    "--retries": ("retries", int),
    "--priority": ("priority", str),
    "--caller": ("caller", str),
    "--json-input": ("json_input", "flag"),
    "--json": ("json", "flag"),
    "--explain": ("explain", "flag"),
    "--batch": ("batch", "flag"),
    "--jobs": ("jobs", int),
    "-j": ("jobs", int),
    "-h": ("help", "flag"),
    "--help": ("help", "flag"),
}
# Bounds of the numeric options (checked by protocol.number, as the daemon checks them).
_BOUNDS: dict[str, dict[str, Any]] = {
    "timeout": {"positive": True},
    "retries": {"minimum": 0},
    "jobs": {"minimum": 1},
}


class ExecOptions:
    """The parsed command line of `engctl exec`."""

    def __init__(self) -> None:
        self.payload: str | None = None
        self.type: str | None = None
        self.engine: str | None = None
        self.instance: str | None = None
        self.cap: list[str] = []
        self.prefer: list[str] = []
        self.label: list[str] = []
        self.strategy: str | None = None
        self.key: str | None = None
        self.lease: str | None = None
        self.timeout: float | None = None
        self.retries = 0
        self.priority: str | None = None
        self.caller: str | None = None
        self.json_input = False
        self.json = False
        self.explain = False
        self.batch = False
        self.jobs = 8
        self.help = False


def parse_args(args: list[str]) -> ExecOptions:
    """Parse `engctl exec` arguments; errors raise UsageError naming the argument.

    A small table-driven parser rather than argparse: argparse's import and its gettext
    lookups cost about as much as the rest of `exec` (the target is 1.3x `engctl --version`).
    """
    opts = ExecOptions()
    rest = iter(args)
    for arg in rest:
        if arg == "--":
            positional = list(rest)
            if len(positional) > 1:
                raise UsageError(f"one payload expected after --, got {len(positional)}")
            if positional:
                _set_payload(opts, positional[0])
            break
        if arg == "-" or not arg.startswith("-"):
            _set_payload(opts, arg)
            continue
        name, eq, inline = arg.partition("=")
        spec = _OPTIONS.get(name)
        if spec is None:
            raise UsageError(f"unknown option {name} (see `engctl exec --help`)")
        dest, kind = spec
        if kind == "flag":
            if eq:
                raise UsageError(f"option {name} takes no value")
            setattr(opts, dest, True)
            continue
        given = inline if eq else next(rest, None)
        if given is None:
            raise UsageError(f"option {name} needs a value (see `engctl exec --help`)")
        value: str = given
        if kind == "list":
            getattr(opts, dest).append(value)
        elif kind is str:
            setattr(opts, dest, value)
        else:
            try:
                parsed = int(value) if kind is int else float(value)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise UsageError(f"option {name} expects {what}, got {value!r}") from None
            try:
                setattr(opts, dest, number(f"option {name}", parsed, **_BOUNDS.get(dest, {})))
            except InvalidParamsError as exc:
                raise UsageError(exc.message) from None
    if opts.priority is not None:
        from engctl.admission_config import parse_priority

        try:
            parse_priority(opts.priority, "option --priority")
        except InvalidParamsError as exc:
            raise UsageError(exc.message) from None
    if opts.strategy is not None and opts.strategy not in STRATEGIES:
        raise UsageError(
            f"unknown strategy {opts.strategy!r} (choose from {', '.join(STRATEGIES)})"
        )
    return opts


def _set_payload(opts: ExecOptions, value: str) -> None:
    if opts.payload is not None:
        raise UsageError("one payload expected (quote it, or put it after --)")
    opts.payload = value


def parse_payload(text: str, json_input: bool) -> Any:
    """The value to send for a payload text (see the module doc)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise UsageError("payload nests too deeply to be parsed (arrays or objects)") from None
    except ValueError as exc:
        if json_input:
            raise UsageError(
                f"payload is not valid JSON ({exc}); drop --json-input to send text"
            ) from None
        return text.removesuffix("\n") if text.endswith("\n") else text


def main(args: list[str]) -> int:
    """Run `engctl exec ARGS`; returns the exit code (errors raise EngctlError)."""
    opts = parse_args(args)
    if opts.help:
        sys.stdout.write(f"{HELP}\n\n{USAGE}\n{EPILOG}")
        return 0
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
        "lease": opts.lease,
        "priority": opts.priority,
        "caller": opts.caller,
    }
    from engctl.client import Client

    if opts.batch:
        if opts.payload not in (None, "-"):
            raise UsageError("--batch reads payloads from stdin; give no payload argument")
        failed = False
        with Client() as c:
            for obj in c.exec_many(_lines(opts.json_input), window=opts.jobs, **filters):
                failed = failed or not obj["ok"]
                sys.stdout.write(json.dumps(obj) + "\n")
                sys.stdout.flush()
        return EXIT_FAILED if failed else 0
    if opts.payload is None:
        raise UsageError("give a payload after `--`, or - to read it from stdin")
    text = _decode(sys.stdin.buffer.read(), "stdin") if opts.payload == "-" else opts.payload
    value = parse_payload(text, opts.json_input)
    with Client() as c:
        try:
            obj = c.exec(value, explain=opts.explain, **filters)
        except EngctlError as exc:
            explain = exc.data.get("explain")
            if opts.explain and isinstance(explain, dict):
                if opts.json:
                    # stdout stays one JSON document: the failure with its explanation.
                    error = {"code": exc.rpc_code, "message": exc.message}
                    sys.stdout.write(
                        json.dumps({"ok": False, "error": error, "explain": explain}) + "\n"
                    )
                else:
                    _print_explain(explain)
            raise
    if opts.explain and "explain" in obj and not opts.json:
        _print_explain(obj["explain"])  # with --json it is the object's "explain" key
    if opts.json:
        sys.stdout.write(json.dumps(obj) + "\n")
    else:
        result = obj.get("result")
        sys.stdout.write((result if isinstance(result, str) else json.dumps(result)) + "\n")
    return 0


def _decode(data: bytes, source: str) -> str:
    """Payload bytes as text; bytes that are not UTF-8 are a usage error naming the place."""
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{source} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _lines(json_input: bool) -> Iterator[Any]:
    """Payloads from stdin, one per non-empty line, read as they are consumed.

    A line that cannot be sent (not UTF-8, not JSON with --json-input, nested too deeply)
    is yielded as its InvalidParamsError: the batch reports it in its place and goes on.
    """
    for n, raw in enumerate(sys.stdin.buffer, 1):
        if not raw.strip():
            continue
        try:
            yield parse_payload(_decode(raw, f"stdin line {n}"), json_input)
        except UsageError as exc:
            message = (
                exc.message
                if exc.message.startswith("stdin line")
                else f"stdin line {n}: {exc.message}"
            )
            yield InvalidParamsError(message)


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
