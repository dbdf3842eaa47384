"""Engine specs: validation from TOML/JSON dicts, defaults, and the dict form for export.

Shared contract between CLI and daemon: stdlib only. Every message names the field it rejects.
One piece past 600 lines: the engine file's schema, its defaults and the reader that checks
each key are read together (docs/configuration.md).
"""

from __future__ import annotations

import math
import re
import shlex
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from engctl.admission_config import (
    RateLimit,
    default_burst,
    format_rate,
    read_cap,
    read_rate,
)
from engctl.errors import SpecError
from engctl.policy_config import PolicyOverrides, overrides_to_toml, parse_policy_table
from engctl.states import EngineMode, OnUnhealthy, RestartPolicy

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_INSTANCES = 1000
# The type of an engine registered without one: no type at all, for the guard rail's groups.
DEFAULT_TYPE = "generic"
# `{index}` in a command, env value or health check is the instance's index (supervisord's
# %(process_num)d, PM2's NODE_APP_INSTANCE); `{{index}}` is a literal `{index}`.
_INDEX_RE = re.compile(r"\{\{index\}\}|\{index\}")


def expand_index(text: str, index: int) -> str:
    """`text` with `{index}` replaced by `index` (and `{{index}}` by a literal `{index}`)."""
    if "{" not in text:
        return text
    return _INDEX_RE.sub(lambda m: "{index}" if m.group(0)[1] == "{" else str(index), text)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(value: Any, where: str) -> int:
    """Bytes from an integer or a string such as "512MiB" or "1.5 GB"."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise SpecError(f"{where}: must be a positive size, got {value}")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
            if size > 0:
                return size
    raise SpecError(f"{where}: expected a size such as 512MiB or 1GB, got {value!r}")


def format_size(n: int) -> str:
    """The shortest exact binary-unit spelling of a byte count (export form)."""
    for unit, mult in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def parse_signal(value: Any, where: str) -> str:
    """Canonical signal name (SIGTERM) from "TERM", "SIGTERM" or 15."""
    try:
        if isinstance(value, int) and not isinstance(value, bool):
            return signal.Signals(value).name
        if isinstance(value, str):
            name = value.strip().upper()
            name = name if name.startswith("SIG") else "SIG" + name
            return signal.Signals[name].name
    except (KeyError, ValueError):
        pass
    raise SpecError(f"{where}: unknown signal {value!r} (use a name such as SIGTERM or SIGINT)")


class _Reader:
    """Reads one TOML table, checking types and ranges, and rejects keys it did not read."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise SpecError(f"{where}: expected a table, got {type(data).__name__}")
        self.data = data
        self.where = where
        self.seen: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}"

    def raw(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def has(self, key: str) -> bool:
        return key in self.data

    def string(self, key: str, default: str) -> str:
        v = self.raw(key)
        if v is None:
            return default
        if not isinstance(v, str):
            raise SpecError(f"{self.path(key)}: expected a string, got {v!r}")
        return v

    def opt_string(self, key: str) -> str | None:
        v = self.raw(key)
        if v is None:
            return None
        if not isinstance(v, str) or not v:
            raise SpecError(f"{self.path(key)}: expected a non-empty string, got {v!r}")
        return v

    def boolean(self, key: str, default: bool) -> bool:
        v = self.raw(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise SpecError(f"{self.path(key)}: expected true or false, got {v!r}")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            raise SpecError(f"{self.path(key)}: expected an integer, got {v!r}")
        if not lo <= v <= hi:
            raise SpecError(f"{self.path(key)}: must be from {lo} to {hi}, got {v}")
        return v

    def number(
        self, key: str, default: float, lo: float, hi: float, *, open_lo: bool = False
    ) -> float:
        v = self.raw(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SpecError(f"{self.path(key)}: expected a number, got {v!r}")
        if v > hi or v < lo or (open_lo and v == lo):
            low = f"above {lo:g}" if open_lo else f"at least {lo:g}"
            raise SpecError(f"{self.path(key)}: must be {low} and at most {hi:g}, got {v:g}")
        return float(v)

    def str_list(self, key: str) -> tuple[str, ...]:
        v = self.raw(key)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise SpecError(f"{self.path(key)}: expected a list of non-empty strings, got {v!r}")
        return tuple(v)

    def str_map(self, key: str, *, environment: bool = False) -> dict[str, str]:
        """A table of strings; with `environment`, one that execve can take (names without
        '=' or NUL, values without NUL)."""
        v = self.raw(key)
        if v is None:
            return {}
        if not isinstance(v, Mapping):
            raise SpecError(f"{self.path(key)}: expected a table of strings, got {v!r}")
        out: dict[str, str] = {}
        for k, val in v.items():
            if not isinstance(val, str | int | float) or isinstance(val, bool):
                raise SpecError(f"{self.path(key)}.{k}: expected a string, got {val!r}")
            name, text = str(k), str(val)
            if environment:
                if not name or "=" in name or "\0" in name:
                    raise SpecError(
                        f"{self.path(key)}: bad variable name {name!r} (an environment name is"
                        " not empty and holds no '=' and no NUL byte)"
                    )
                _no_nul(text, f"{self.path(key)}.{name}")
            out[name] = text
        return out

    def exec_string(self, key: str) -> str | None:
        """An optional non-empty string that goes to the kernel (a path): no NUL byte."""
        v = self.opt_string(key)
        if v is not None:
            _no_nul(v, self.path(key))
        return v

    def table(self, key: str) -> _Reader:
        v = self.raw(key)
        return _Reader({} if v is None else v, self.path(key))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise SpecError(f"{self.path(unknown[0])}: unknown key {unknown[0]!r}")


def _no_nul(text: str, where: str) -> None:
    """Refuse a NUL byte in what becomes an argv, an environment or a path (C strings end at
    NUL: the kernel cannot take it, and a spawn would fail every time)."""
    if "\0" in text:
        raise SpecError(f"{where}: holds a NUL byte, which a command, environment or path cannot")


@dataclass(frozen=True)
class BackoffSpec:
    """Delay before restart n: initial × factor^(n-1), capped at max; reset after healthy uptime
    (computed by `engctl.daemon.backoff`)."""

    initial: float = 0.5
    factor: float = 2.0
    max: float = 30.0
    reset_after: float = 60.0


@dataclass(frozen=True)
class RestartSpec:
    """When and how fast an exited instance comes back."""

    policy: RestartPolicy = RestartPolicy.ON_FAILURE
    start_seconds: float = 1.0
    max_retries: int = 5
    backoff: BackoffSpec = field(default_factory=BackoffSpec)


@dataclass(frozen=True)
class StopSpec:
    """How an instance is asked to stop before its process group is killed."""

    signal: str = "SIGTERM"
    timeout: float = 10.0


@dataclass(frozen=True)
class HealthSpec:
    """Health probe settings (acted on by the policy layer)."""

    check: str | None = None
    interval: float = 5.0
    timeout: float = 2.0
    failure_threshold: int = 3
    success_threshold: int = 2
    grace: float = 0.0
    # What unhealthy does: isolate (the default for workers) or restart (for services).
    on_unhealthy: OnUnhealthy = OnUnhealthy.ISOLATE


@dataclass(frozen=True)
class LimitsSpec:
    """Resource limits watched by the monitor (max_rss, max_cpu_percent), and the engine's
    admission limits (rate and burst, max_in_flight across its instances, adaptive)."""

    max_rss: int | None = None
    max_cpu_percent: float | None = None
    rate: float | None = None  # requests per second (a token bucket)
    burst: int | None = None  # tokens the bucket holds (default: one second's worth)
    max_in_flight: int | None = None
    adaptive: bool = False  # a gradient controller sets the in-flight limit

    @property
    def rate_limit(self) -> RateLimit | None:
        """The engine's token bucket, if it has a rate."""
        if self.rate is None:
            return None
        return RateLimit(self.rate, default_burst(self.rate) if self.burst is None else self.burst)


@dataclass(frozen=True)
class ScaleSpec:
    """Autoscaling of a worker engine (`[engines.NAME.scale]`, docs/elastic.md): its instance
    count follows demand between `min` and `max`, keeping `min_idle` ready spares."""

    min: int = 1  # 0: scale to zero (a request then waits for a cold start)
    max: int = 4
    min_idle: int = 0  # ready, idle instances kept beyond current demand (a warm pool)
    target: float = 0.8  # the share of busy slots to aim for; above it, add instances
    idle_timeout: float = 60.0  # seconds of surplus before an instance is reclaimed
    predict: bool = False  # raise the floor ahead of recurring peaks seen in the history

    @property
    def floor(self) -> int:
        """The instances wanted with no demand: `min`, or the warm pool if larger."""
        return max(self.min, min(self.min_idle, self.max))


@dataclass(frozen=True)
class RolloutSpec:
    """How a rolling reload replaces the instances (Kubernetes' RollingUpdate): at most
    `max_surge` processes beyond `instances`, and never fewer than `instances -
    max_unavailable` serving. Services with a fixed port per index want 0 and 1."""

    max_surge: int = 1
    max_unavailable: int = 0


def check_rollout(max_surge: int, max_unavailable: int, where: str = "rollout") -> None:
    """Refuse a rollout that could never replace anything (no surge and no unavailability)."""
    if max_surge == 0 and max_unavailable == 0:
        raise SpecError(
            f"{where}: max_surge and max_unavailable cannot both be 0 (no instance could be"
            " replaced: allow a surge process, or one instance down at a time)"
        )


# Fields whose change needs new processes; any other change is applied in place.
RESTART_FIELDS = frozenset({"command", "shell", "mode", "cwd", "env"})


@dataclass(frozen=True)
class EngineSpec:
    """A registered engine: everything needed to run and dispatch to it."""

    name: str
    command: tuple[str, ...]
    type: str = DEFAULT_TYPE
    mode: EngineMode = EngineMode.WORKER
    shell: bool = False
    instances: int = 1
    max_concurrency: int = 1
    capabilities: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    depends_on: tuple[str, ...] = ()
    # Workers: seconds warming up (after start_seconds) without an answer to ping or a
    # `ready` before the start counts as failed.
    start_timeout: float = 60.0
    # Workers: seconds a request may go unanswered before the hang policy pings the instance
    # (and kills it if the ping goes unanswered too). A caller's deadline never judges it.
    hang_timeout: float = 60.0
    restart: RestartSpec = field(default_factory=RestartSpec)
    stop: StopSpec = field(default_factory=StopSpec)
    health: HealthSpec = field(default_factory=HealthSpec)
    limits: LimitsSpec = field(default_factory=LimitsSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    # Failure-policy settings this engine overrides (`[engines.NAME.policy]`).
    policy: PolicyOverrides = field(default_factory=dict)
    # A free string shown by `list` (seed 000's EngineRegistration version).
    version: str = ""
    # Autoscaling (`[engines.NAME.scale]`): None keeps `instances` a fixed count.
    scale: ScaleSpec | None = None

    @property
    def argv(self) -> list[str]:
        """The argv to exec: the command itself, or `/bin/sh -c` for shell engines."""
        if self.shell:
            return ["/bin/sh", "-c", " ".join(self.command)]
        return list(self.command)

    def argv_for(self, index: int) -> list[str]:
        """The argv of instance `index` (`{index}` expanded)."""
        return [expand_index(a, index) for a in self.argv]

    def env_for(self, index: int) -> dict[str, str]:
        """The env of instance `index` (`{index}` expanded in the values)."""
        return {k: expand_index(v, index) for k, v in self.env.items()}

    def changed_fields(self, other: EngineSpec) -> set[str]:
        """Top-level fields that differ between two specs of the same engine."""
        return {f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)}

    def needs_restart(self, other: EngineSpec) -> bool:
        """Whether going from `other` to this spec needs new processes."""
        return bool(self.changed_fields(other) & RESTART_FIELDS)

    def with_process_of(self, other: EngineSpec) -> EngineSpec:
        """This spec, with the process of `other` (its RESTART_FIELDS): what an instance still
        running `other` follows after an in-place change (weight, limits, …)."""
        return replace(self, **{f: getattr(other, f) for f in RESTART_FIELDS})

    def with_instances(self, n: int) -> EngineSpec:
        """The same spec scaled to `n` instances."""
        if not 0 <= n <= MAX_INSTANCES:
            raise SpecError(f"instances: must be from 0 to {MAX_INSTANCES}, got {n}")
        return replace(self, instances=n)

    def with_scale_min(self, n: int) -> EngineSpec:
        """The same autoscaled spec with `scale.min` set to `n` (`engctl scale`)."""
        assert self.scale is not None
        if not 0 <= n <= self.scale.max:
            raise SpecError(
                f"scale.min: {n} is above scale.max {self.scale.max} of engine {self.name!r}"
                " (raise max in its engine file)"
                if n > self.scale.max
                else f"scale.min: must be 0 or more, got {n}"
            )
        return replace(self, scale=replace(self.scale, min=n))

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any], where: str | None = None) -> EngineSpec:
        """Validate one `[engines.NAME]` table; raise SpecError naming the bad field."""
        where = where or f"engines.{name}"
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise SpecError(
                f"{where}: bad engine name {name!r} (letters, digits, '.', '_', '-';"
                " starts with a letter or digit; at most 63 characters)"
            )
        r = _Reader(data, where)
        shell = r.boolean("shell", False)
        command = _command(r, shell)
        mode_s = r.string("mode", EngineMode.WORKER.value)
        try:
            mode = EngineMode(mode_s)
        except ValueError:
            raise SpecError(
                f"{r.path('mode')}: must be worker, oneshot or service, got {mode_s!r}"
            ) from None
        spec = cls(
            name=name,
            command=command,
            type=r.string("type", DEFAULT_TYPE) or DEFAULT_TYPE,
            mode=mode,
            shell=shell,
            instances=r.integer("instances", 1, 0, MAX_INSTANCES),
            max_concurrency=r.integer("max_concurrency", 1, 1, 10_000),
            capabilities=r.str_list("capabilities"),
            labels=r.str_map("labels"),
            weight=r.number("weight", 1.0, 0.0, 1000.0, open_lo=True),
            cwd=r.exec_string("cwd"),
            env=r.str_map("env", environment=True),
            depends_on=r.str_list("depends_on"),
            start_timeout=r.number("start_timeout", 60.0, 0.0, 86400.0, open_lo=True),
            hang_timeout=r.number("hang_timeout", 60.0, 0.0, 86400.0, open_lo=True),
            restart=_restart(r.table("restart")),
            stop=_stop(r.table("stop")),
            health=_health(r.table("health"), mode),
            limits=_limits(r.table("limits")),
            rollout=_rollout(r.table("rollout")),
            policy=_policy(r),
            version=r.string("version", ""),
            scale=_scale(r, mode),
        )
        r.done()
        if name in spec.depends_on:
            raise SpecError(f"{r.path('depends_on')}: an engine cannot depend on itself")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The TOML/JSON form: command plus every key that differs from its default."""
        out: dict[str, Any] = {"command": list(self.command)}
        default = EngineSpec(name=self.name, command=self.command)
        for key in (
            "type",
            "mode",
            "shell",
            "instances",
            "max_concurrency",
            "weight",
            "cwd",
            "version",
            "start_timeout",
            "hang_timeout",
        ):
            value = getattr(self, key)
            if value != getattr(default, key):
                out[key] = value.value if isinstance(value, EngineMode) else value
        for key in ("capabilities", "depends_on"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        for key in ("labels", "env"):
            if getattr(self, key):
                out[key] = dict(getattr(self, key))
        restart = _diff(self.restart, RestartSpec(), skip={"backoff"})
        backoff = _diff(self.restart.backoff, BackoffSpec())
        if backoff:
            restart["backoff"] = backoff
        if restart:
            out["restart"] = restart
        for key, dflt in (("stop", StopSpec()), ("health", _default_health(self.mode))):
            sub = _diff(getattr(self, key), dflt)
            if key == "health" and self.health.check is None and self.mode is EngineMode.WORKER:
                sub["check"] = "none"  # a disabled default check must survive the round trip
            if sub:
                out[key] = sub
        rollout = _diff(self.rollout, RolloutSpec())
        if rollout:
            out["rollout"] = rollout
        limits = _diff(self.limits, LimitsSpec())
        if "max_rss" in limits:
            limits["max_rss"] = format_size(limits["max_rss"])
        if "rate" in limits:
            limits["rate"] = format_rate(limits["rate"])
        if limits:
            out["limits"] = limits
        if self.policy:
            out["policy"] = overrides_to_toml(self.policy)
        if self.scale is not None:
            out["scale"] = _diff(self.scale, ScaleSpec())
        return out


def _diff(value: Any, default: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(value):
        v = getattr(value, f.name)
        if f.name in skip or v == getattr(default, f.name) or v is None:
            continue
        out[f.name] = v.value if isinstance(v, RestartPolicy | OnUnhealthy) else v
    return out


def _command(r: _Reader, shell: bool) -> tuple[str, ...]:
    return parse_argv(r.raw("command"), r.path("command"), shell)


def parse_argv(raw: Any, where: str, shell: bool = False) -> tuple[str, ...]:
    """A command as its argv: a list of strings, or a string split as a shell would (kept
    whole when `shell`); a SpecError naming `where` for anything else, empty, or with a NUL."""
    if raw is None:
        raise SpecError(f'{where}: missing (the argv to run, e.g. ["python3", "app.py"])')
    if isinstance(raw, str):
        if not raw.strip():
            raise SpecError(f"{where}: empty command")
        if shell:
            return (raw,)
        try:
            argv = tuple(shlex.split(raw))
        except ValueError as exc:
            raise SpecError(f"{where}: cannot split {raw!r}: {exc}") from exc
    elif isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        argv = tuple(raw)
    else:
        raise SpecError(f"{where}: expected a list of strings or a string, got {raw!r}")
    if not argv or not argv[0].strip():
        raise SpecError(f"{where}: empty command")
    for i, arg in enumerate(argv):
        _no_nul(arg, where if isinstance(raw, str) else f"{where}[{i}]")
    return argv


def _restart(r: _Reader) -> RestartSpec:
    policy_s = r.string("policy", RestartPolicy.ON_FAILURE.value)
    try:
        policy = RestartPolicy(policy_s)
    except ValueError:
        raise SpecError(
            f"{r.path('policy')}: must be always, on-failure or never, got {policy_s!r}"
        ) from None
    b = r.table("backoff")
    backoff = BackoffSpec(
        initial=b.number("initial", 0.5, 0.0, 3600.0),
        factor=b.number("factor", 2.0, 1.0, 100.0),
        max=b.number("max", 30.0, 0.0, 86400.0),
        reset_after=b.number("reset_after", 60.0, 0.0, 86400.0),
    )
    b.done()
    spec = RestartSpec(
        policy=policy,
        start_seconds=r.number("start_seconds", 1.0, 0.0, 3600.0),
        max_retries=r.integer("max_retries", 5, 0, 1_000_000),
        backoff=backoff,
    )
    r.done()
    return spec


def _stop(r: _Reader) -> StopSpec:
    sig = r.raw("signal")
    spec = StopSpec(
        signal="SIGTERM" if sig is None else parse_signal(sig, r.path("signal")),
        timeout=r.number("timeout", 10.0, 0.0, 3600.0),
    )
    r.done()
    return spec


_CHECK_RE = re.compile(
    r"^(ping|none|command:.+|http://.+|https://.+|http:.+|tcp:[^:]+:(\d|\{index\})+)$"
)


def _default_health(mode: EngineMode) -> HealthSpec:
    if mode is EngineMode.WORKER:
        return HealthSpec(check="ping")
    return HealthSpec(check=None, on_unhealthy=OnUnhealthy.RESTART)


def _health(r: _Reader, mode: EngineMode) -> HealthSpec:
    default = _default_health(mode)
    check = r.opt_string("check") or default.check
    if check is not None and not _CHECK_RE.match(check):
        raise SpecError(
            f'{r.path("check")}: expected ping, none, "command:<argv>", "http:<url>" or'
            f' "tcp:<host:port>", got {check!r}'
        )
    if check is not None:
        _no_nul(check, r.path("check"))
    if check == "ping" and mode is not EngineMode.WORKER:
        raise SpecError(f'{r.path("check")}: ping needs mode = "worker" (this engine is {mode})')
    spec = HealthSpec(
        check=None if check == "none" else check,
        interval=r.number("interval", 5.0, 0.0, 86400.0, open_lo=True),
        timeout=r.number("timeout", 2.0, 0.0, 3600.0, open_lo=True),
        failure_threshold=r.integer("failure_threshold", 3, 1, 1000),
        success_threshold=r.integer("success_threshold", 2, 1, 1000),
        grace=r.number("grace", 0.0, 0.0, 86400.0),
        on_unhealthy=_on_unhealthy(r, default.on_unhealthy),
    )
    r.done()
    return spec


def _on_unhealthy(r: _Reader, default: OnUnhealthy) -> OnUnhealthy:
    text = r.string("on_unhealthy", default.value)
    try:
        return OnUnhealthy(text)
    except ValueError:
        raise SpecError(
            f"{r.path('on_unhealthy')}: must be isolate or restart, got {text!r}"
        ) from None


def _rollout(r: _Reader) -> RolloutSpec:
    spec = RolloutSpec(
        max_surge=r.integer("max_surge", 1, 0, MAX_INSTANCES),
        max_unavailable=r.integer("max_unavailable", 0, 0, MAX_INSTANCES),
    )
    r.done()
    check_rollout(spec.max_surge, spec.max_unavailable, r.where)
    return spec


def _policy(r: _Reader) -> PolicyOverrides:
    raw = r.raw("policy")
    return {} if raw is None else parse_policy_table(raw, r.path("policy"))


def _scale(r: _Reader, mode: EngineMode) -> ScaleSpec | None:
    """`[engines.NAME.scale]`: for worker engines only, and then `instances` is the
    autoscaler's (not a key of the file)."""
    if not r.has("scale"):
        return None
    where = r.path("scale")
    if mode is EngineMode.SERVICE:
        raise SpecError(
            f"{where}: autoscaling applies to worker engines; a service takes no requests to"
            " scale on (set instances instead)"
        )
    if mode is EngineMode.ONESHOT:
        raise SpecError(
            f"{where}: autoscaling applies to worker engines; a oneshot engine starts a"
            " process per request (set max_concurrency, its runs at once, instead)"
        )
    if r.has("instances"):
        raise SpecError(
            f"{r.path('instances')}: not with [{where}]: the autoscaler sets the count between"
            " scale.min and scale.max (leave instances out)"
        )
    t = r.table("scale")
    spec = ScaleSpec(
        min=t.integer("min", ScaleSpec.min, 0, MAX_INSTANCES),
        max=t.integer("max", ScaleSpec.max, 1, MAX_INSTANCES),
        min_idle=t.integer("min_idle", ScaleSpec.min_idle, 0, MAX_INSTANCES),
        target=t.number("target", ScaleSpec.target, 0.0, 1.0, open_lo=True),
        idle_timeout=t.number("idle_timeout", ScaleSpec.idle_timeout, 0.0, 86400.0, open_lo=True),
        predict=t.boolean("predict", ScaleSpec.predict),
    )
    t.done()
    if spec.min > spec.max:
        raise SpecError(f"{t.path('min')}: {spec.min} is above scale.max {spec.max}")
    if spec.min_idle > spec.max:
        raise SpecError(f"{t.path('min_idle')}: {spec.min_idle} is above scale.max {spec.max}")
    return spec


def _limits(r: _Reader) -> LimitsSpec:
    rss = r.raw("max_rss")
    bucket = read_rate({k: r.raw(k) for k in ("rate", "burst") if r.has(k)}, r.where)
    spec = LimitsSpec(
        max_rss=None if rss is None else parse_size(rss, r.path("max_rss")),
        max_cpu_percent=(
            r.number("max_cpu_percent", 0.0, 0.0, 100_000.0, open_lo=True)
            if r.has("max_cpu_percent")
            else None
        ),
        rate=None if bucket is None else bucket.rate,
        burst=r.raw("burst"),
        max_in_flight=read_cap({"max_in_flight": r.raw("max_in_flight")}, "max_in_flight", r.where),
        adaptive=r.boolean("adaptive", False),
    )
    r.done()
    return spec


def parse_engines_document(doc: Mapping[str, Any]) -> list[EngineSpec]:
    """Specs from a parsed engines file (`[engines.NAME]` tables); rejects unknown top keys."""
    unknown = sorted(set(doc) - {"engines"})
    if unknown:
        raise SpecError(f"{unknown[0]}: unknown top-level key (expected [engines.NAME] tables)")
    engines = doc.get("engines", {})
    if not isinstance(engines, Mapping):
        raise SpecError("engines: expected tables such as [engines.web]")
    return [EngineSpec.from_dict(name, data) for name, data in engines.items()]


def check_dependencies(specs: Mapping[str, EngineSpec]) -> list[str]:
    """Names in dependency order; raise SpecError on an unknown dependency or a cycle (its path)."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in specs[name].depends_on:
            if dep not in specs:
                raise SpecError(f"engines.{name}.depends_on: unknown engine {dep!r}")
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep]
                raise SpecError(f"dependency cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2
        order.append(name)

    for name in sorted(specs):
        if name not in state:
            visit(name)
    return order


# The index part of the id under which a oneshot engine's runs are counted (`name#oneshot`).
ONESHOT_INDEX = "oneshot"


def instance_id(name: str, index: int | None) -> str:
    """The id `name#k` of instance k of engine `name`; `name#oneshot` (index None) for the
    runs of a oneshot engine."""
    return f"{name}#{ONESHOT_INDEX if index is None else index}"


def split_instance_id(inst_id: str) -> tuple[str, str | None]:
    """(engine name, index text) of `name#k` or `name#oneshot`; (name, None) for a bare name.
    The one place an instance id is taken apart (engine names cannot contain `#`)."""
    name, sep, index = inst_id.partition("#")
    return name, index if sep else None


def parse_instance_ref(ref: str) -> tuple[str, int | None]:
    """Split "name#k" into (name, k); a bare name gives (name, None)."""
    name, idx = split_instance_id(ref)
    if idx is None:
        return name, None
    if not (idx.isascii() and idx.isdigit()):  # int() rejects some Unicode digits (²)
        raise SpecError(f"{ref!r}: expected NAME or NAME#INDEX, e.g. web#0")
    return name, int(idx)
