"""The JSON documents on the wire, as TypedDicts: `status`, the `exec` result, an event, the
`report` and `top`'s live figures (their reference: docs/json.md).

For the type checker only: the daemon builds these documents, the client returns them and
`render` reads them, and each imports this module under `TYPE_CHECKING`, so that no command
pays for `typing` at start-up. Shared contract: imports the stdlib only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NotRequired, TypedDict

# -- status.get ---------------------------------------------------------------------------------


class RequestCounts(TypedDict):
    """An instance's (or a oneshot engine's) request counters."""

    in_flight: int
    requests: int
    ok: int
    errors: int
    timeouts: int
    lost: int
    consecutive_errors: int
    protocol_errors: int
    latency_ewma_ms: float | None


class LastExit(TypedDict):
    """How the instance's last process ended (`error`: a spawn that failed)."""

    code: int | None
    signal: str | None
    at: float
    error: NotRequired[str]
    cause: NotRequired[str]


class LeaseDoc(TypedDict):
    """A lease (`lease list --json`, `lease.acquire`, and `lease` of an instance in `status`)."""

    lease: str
    holder: str
    engine: str
    instance: str
    ttl: float
    acquired_at: float
    expires_at: float


class InstanceStatus(TypedDict):
    """One instance in `status --json`: its three axes (state, health, eligibility) and its
    figures."""

    id: str
    role: str  # current, or during a rollout successor / retiring (in the engine's `surge`)
    generation: int
    pid: int | None
    state: str
    state_reason: str
    state_since: float
    health: str
    health_reason: str
    eligibility: str
    eligibility_reason: str
    isolated_until: float | None
    weight: float
    effective_weight: float
    isolations: int
    restarts: int
    uptime_s: float | None
    cpu_percent: float | None
    rss_bytes: int | None
    threads: int | None
    fds: int | None
    last_exit: LastExit | None
    requests: RequestCounts
    lease: LeaseDoc | None


class ScaleDecision(TypedDict):
    """The autoscaler's last decision for an engine (as its `engine.autoscaled` event)."""

    at: float
    to: int
    cause: str
    reason: str
    data: dict[str, Any]


class ScalePrewarm(TypedDict):
    instances: int
    until: float | None


class ScalePrediction(TypedDict):
    instances: int
    reason: str


class ScaleStatus(TypedDict):
    """An autoscaled engine in `status --json`: its `[scale]` settings, its instances by use
    (wanted: slots; ready; busy: running a request; idle; leased) and the last decision."""

    min: int
    max: int
    min_idle: int
    target: float
    idle_timeout: float
    predict: bool
    wanted: int
    ready: int
    busy: int
    idle: int
    leased: int
    prewarm: ScalePrewarm | None
    predicted: ScalePrediction | None
    last_decision: ScaleDecision | None


class RolloutDoc(TypedDict):
    """An engine's rollout (`reload --json`, `status --json` "rollout"); `ok` is null while
    it runs, `reason` why it failed ("" otherwise)."""

    engine: str
    generation: int
    strategy: str
    cause: str
    state: str
    ok: bool | None
    reason: str
    steps: int
    replaced: list[str]
    total: int
    max_surge: int
    max_unavailable: int
    started_at: float
    duration_s: float


class EngineStatus(TypedDict):
    """One engine in `status --json`; a oneshot engine has counters of its own instead of
    instances. `surge`: a rollout's processes beyond the slots' current ones."""

    name: str
    type: str
    mode: str
    desired: str
    instances_wanted: int
    instances: list[InstanceStatus]
    generation: int
    surge: list[InstanceStatus]
    rollout: RolloutDoc | None
    requests: NotRequired[RequestCounts]
    max_concurrency: NotRequired[int]
    scale: NotRequired[ScaleStatus]
    # The engine's admission gate (docs/json.md#status), None without limits of its own.
    admission: NotRequired[dict[str, Any] | None]


class StatusDoc(TypedDict):
    """`status.get`: the chosen engines, in name order, and the daemon's admission limits."""

    engines: list[EngineStatus]
    admission: NotRequired[dict[str, Any]]


# -- request.exec -------------------------------------------------------------------------------


class ExecError(TypedDict):
    """A failed request's error, as `Client.exec_many` yields it."""

    code: int | None
    message: str


class ExecOptions(TypedDict, total=False):
    """The keyword options of `Client.exec` and `Client.exec_many` (all optional): the
    request's filters, strategy, deadline and retries (docs/dispatch.md)."""

    type: str | None
    engine: str | None
    instance: str | None
    require: Iterable[str]
    prefer: Iterable[str]
    labels: Mapping[str, str] | Iterable[str] | None
    key: str | None
    strategy: str | None
    timeout: float | None
    retries: int
    explain: bool
    lease: str | None
    priority: int | str | None
    caller: str | None


class ExecResult(TypedDict):
    """The result object of one request (`protocol.exec_result` encodes it); on a failure it
    is the error's data (ok false), without `result`."""

    request_id: str | None
    engine: str | None
    instance: str | None
    ok: bool
    latency_ms: float | None
    attempts: int
    result: NotRequired[Any]
    explain: NotRequired[dict[str, Any]]
    error: NotRequired[ExecError]


# -- lease.* -----------------------------------------------------------------------------------


class LeasesDoc(TypedDict):
    """`lease.list`: every lease held, oldest first."""

    leases: list[LeaseDoc]


# -- events.list, events.follow -----------------------------------------------------------------

# One event (`from` and `to`, the state edge, are Python keywords: hence this form).
EventDoc = TypedDict(
    "EventDoc",
    {
        "id": int,
        "at": float,
        "kind": str,
        "engine": str | None,
        "instance": str | None,
        "from": str | None,
        "to": str | None,
        "reason": str,
        "data": dict[str, Any],
    },
)


class EventsDoc(TypedDict):
    """`events.list`: the newest events, oldest first."""

    events: list[EventDoc]


# -- metrics.live (top) -------------------------------------------------------------------------


class LiveFigures(TypedDict):
    """An instance's (or oneshot engine's) figures over the last few seconds."""

    window_s: float
    rps: float
    success_rate: float | None
    p50_ms: float | None
    p99_ms: float | None


class LiveHost(TypedDict):
    cpu_percent: float
    memory_used: int
    memory_total: int


class LiveDoc(TypedDict):
    """`metrics.live`: what `top` shows besides `status`."""

    instances: dict[str, LiveFigures]
    queue: dict[str, int]
    admission: NotRequired[dict[str, dict[str, Any]]]
    host: LiveHost | None


# -- report -------------------------------------------------------------------------------------


class LatencySummary(TypedDict):
    count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    mean_ms: float | None


class ReportFigures(TypedDict):
    """Request counts, rates and latency over the period."""

    requests: int
    ok: int
    errors: int
    timeouts: int
    lost: int
    success_rate: float | None
    throughput_rps: float | None
    latency: LatencySummary
    restarts: int
    isolations: int


class ReportInstance(ReportFigures):
    id: str
    cpu_percent_mean: float | None
    rss_bytes_max: int | None
    state_seconds: dict[str, float]
    weight: float | None
    max_rss: int | None


class ReportEngine(ReportFigures):
    name: str
    type: str
    instances: list[ReportInstance]


class ReportType(TypedDict):
    type: str
    instances: int
    queued_share: float | None
    queue_max: int
    samples: int


class ReportHost(TypedDict):
    cpu_percent_mean: float | None
    memory_used_max: int | None
    memory_total: int | None
    disk_read_bytes: int
    disk_write_bytes: int
    net_sent_bytes: int
    net_recv_bytes: int


class ReportPeriod(TypedDict):
    since: float
    until: float
    seconds: float
    covered_seconds: float
    bucket_seconds: int
    engine: str | None


class WorstByErrors(TypedDict):
    instance: str
    error_rate: float
    requests: int


class WorstByP99(TypedDict):
    instance: str
    p99_ms: float
    requests: int


class ReportWorst(TypedDict):
    by_error_rate: list[WorstByErrors]
    by_p99: list[WorstByP99]


class ReportAction(TypedDict):
    """A policy action of the period (an event; crashes as `instance.crashed`/`.fatal`)."""

    at: float
    kind: str
    engine: str | None
    instance: str | None
    reason: str
    data: dict[str, Any]


class Suggestion(TypedDict):
    kind: str
    target: str
    message: str
    evidence: dict[str, Any]


class ReportDoc(TypedDict):
    """`report --json`."""

    period: ReportPeriod
    totals: ReportFigures
    engines: list[ReportEngine]
    types: list[ReportType]
    host: ReportHost
    worst: ReportWorst
    actions: list[ReportAction]
    suggestions: list[Suggestion]
