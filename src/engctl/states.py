"""States of instances, their health and dispatch eligibility: the vocabulary on the wire.

Shared contract between CLI and daemon: stdlib only.
"""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    """Lifecycle of one instance (docs/supervision.md).

    `busy` is a display state, never entered: `status` shows it for a `ready` instance whose
    every slot is taken (in flight = max_concurrency). Deriving it keeps the request hot path
    free of a transition and an event per request; no edge of TRANSITIONS leads to it.
    """

    STOPPED = "stopped"
    STARTING = "starting"
    WARMING = "warming"
    READY = "ready"
    BUSY = "busy"  # shown only (see above)
    STOPPING = "stopping"
    BACKOFF = "backoff"
    EXITED = "exited"
    FATAL = "fatal"

    @property
    def has_process(self) -> bool:
        """True while an OS process may exist for the instance."""
        return self in _WITH_PROCESS

    @property
    def is_running(self) -> bool:
        """True once the process has stayed up `start_seconds`."""
        return self in _RUNNING


_WITH_PROCESS = frozenset(
    {
        InstanceState.STARTING,
        InstanceState.WARMING,
        InstanceState.READY,
        InstanceState.BUSY,
        InstanceState.STOPPING,
    }
)

_RUNNING = frozenset({InstanceState.WARMING, InstanceState.READY, InstanceState.BUSY})

_S = InstanceState
# Every legal edge. Anything else is a bug in the supervisor, raised loudly.
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    _S.STOPPED: frozenset({_S.STARTING}),
    _S.STARTING: frozenset({_S.WARMING, _S.READY, _S.STOPPING, _S.BACKOFF, _S.EXITED, _S.FATAL}),
    _S.WARMING: frozenset({_S.READY, _S.STOPPING, _S.BACKOFF, _S.EXITED, _S.FATAL}),
    _S.READY: frozenset({_S.STOPPING, _S.BACKOFF, _S.EXITED, _S.FATAL}),
    _S.BUSY: frozenset(),  # a display state: never entered, so never left
    _S.STOPPING: frozenset({_S.STOPPED}),
    _S.BACKOFF: frozenset({_S.STARTING, _S.STOPPED, _S.FATAL}),
    _S.EXITED: frozenset({_S.STARTING, _S.STOPPED}),
    _S.FATAL: frozenset({_S.STARTING, _S.STOPPED}),
}


def can_transition(old: InstanceState, new: InstanceState) -> bool:
    """Whether `old -> new` is an edge of the lifecycle."""
    return new in TRANSITIONS[old]


class Health(StrEnum):
    """Result of health probes; a separate axis from the lifecycle."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    RECOVERING = "recovering"


class Eligibility(StrEnum):
    """Whether dispatch may pick the instance."""

    ACTIVE = "active"
    DOWNWEIGHTED = "downweighted"
    ISOLATED = "isolated"
    DRAINING = "draining"
    # No process that takes requests: stopped, starting, warming, stopping, backoff, exited or
    # fatal (derived from the state; the reason says which and why).
    UNAVAILABLE = "unavailable"


class OnUnhealthy(StrEnum):
    """What a failed health check (`failure_threshold` in a row) does to an instance."""

    ISOLATE = "isolate"  # no dispatch until healthy again (the process keeps running)
    RESTART = "restart"  # drain, then a graceful restart (Kubernetes' liveness probe)


class EngineMode(StrEnum):
    """How requests reach an engine (docs/dispatch.md)."""

    WORKER = "worker"
    ONESHOT = "oneshot"
    SERVICE = "service"

    @property
    def long_running(self) -> bool:
        """Worker and service engines keep processes up; oneshot spawns per request."""
        return self is not EngineMode.ONESHOT


class RestartPolicy(StrEnum):
    """When an exited instance is started again."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"

    def wants_restart(self, exit_code: int | None, expected: bool) -> bool:
        """Decide for one exit: `exit_code` is None when a signal ended the process."""
        if expected or self is RestartPolicy.NEVER:
            return False
        if self is RestartPolicy.ALWAYS:
            return True
        return exit_code != 0


class RequestOutcome(StrEnum):
    """How one attempt of a request on an instance ended: exactly one per attempt, so an
    instance's `requests` is always the sum of its outcomes (status, history, Prometheus)."""

    OK = "ok"
    ERROR = "error"  # an error answer, protocol garbage, or a oneshot that failed
    TIMEOUT = "timeout"  # the caller's deadline passed first; a late answer is discarded
    LOST = "lost"  # its process died or stopped (or closed its stdout) with it in flight


class InstanceRole(StrEnum):
    """Which process of its slot an instance record is (`status --json` "role").

    A rolling reload that surges runs two processes for one slot `NAME#K` for a moment: the
    slot's current one, and its successor until it takes the slot (then the old one retires:
    it drains and stops). Only the current one is ever in dispatch.
    """

    CURRENT = "current"
    SUCCESSOR = "successor"  # started by a rollout, warming up; takes the slot once ready
    RETIRING = "retiring"  # replaced by its successor: draining, then stopped


class RolloutState(StrEnum):
    """Where an engine's rollout is (`status --json` "rollout.state")."""

    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class RolloutStrategy(StrEnum):
    """How a rollout replaces processes: one slot after another within max_surge and
    max_unavailable (rolling), or every one at once (recreate: the old stop-all-then-start)."""

    ROLLING = "rolling"
    RECREATE = "recreate"


class DesiredState(StrEnum):
    """What the user asked an engine to be; survives daemon restarts."""

    RUNNING = "running"
    STOPPED = "stopped"


class EventKind(StrEnum):
    """What an event records (`events --json` "kind", docs/json.md): every `emit` names one.
    Past tense, `noun.what_happened`; `report` picks the policy actions by these."""

    # instances: lifecycle (supervisor)
    INSTANCE_STATE = "instance.state"  # every transition, with from/to
    INSTANCE_SPAWNED = "instance.spawned"
    INSTANCE_WARMUP_PROBLEM = "instance.warmup_problem"
    INSTANCE_FAILED = "instance.failed"  # judged failed by the daemon: stopped as a crash
    INSTANCE_DRAINING = "instance.draining"  # before a stop or a restart (data `cause`)
    INSTANCE_DRAIN_TIMEOUT = "instance.drain_timeout"
    INSTANCE_KILLED = "instance.killed"  # did not stop within its stop timeout
    INSTANCE_REPLACED = "instance.replaced"  # a rollout's step: a new process took the slot
    # instances: failure policies and manual overrides (enforcer)
    INSTANCE_ELIGIBILITY = "instance.eligibility"
    INSTANCE_HEALTH = "instance.health"  # data from_health, to_health
    INSTANCE_ISOLATED = "instance.isolated"
    INSTANCE_RETURNED = "instance.returned"
    INSTANCE_RESTORED = "instance.restored"
    INSTANCE_DRAIN = "instance.drain"  # drained by hand
    INSTANCE_HUNG = "instance.hung"
    INSTANCE_DOWNWEIGHTED = "instance.downweighted"
    INSTANCE_WEIGHT_RESTORED = "instance.weight_restored"
    POLICY_GUARD_RAIL = "policy.guard_rail"
    # alert rules (`[alerts.NAME]` and the built-in cpu and memory rules), on the policy tick
    ALERT_PENDING = "alert.pending"
    ALERT_FIRING = "alert.firing"
    ALERT_RESOLVED = "alert.resolved"
    # engines
    ENGINE_REGISTERED = "engine.registered"
    ENGINE_UPDATED = "engine.updated"
    ENGINE_UNREGISTERED = "engine.unregistered"
    ENGINE_SCALED = "engine.scaled"
    ENGINE_DEPENDENCY_TIMEOUT = "engine.dependency_timeout"
    ENGINE_STOPPING_DEPENDENTS = "engine.stopping_dependents"
    ENGINE_START_FAILED = "engine.start_failed"
    # elastic pools (the autoscaler, docs/elastic.md): each with its reason and numbers
    ENGINE_AUTOSCALED = "engine.autoscaled"  # data from, to, cause, and the figures
    ENGINE_RECLAIMED = "engine.reclaimed"  # idle instances stopped for host memory
    ENGINE_PREWARMED = "engine.prewarmed"  # `engctl prewarm`: a floor until a time
    ENGINE_PREWARM_ENDED = "engine.prewarm_ended"
    ENGINE_PREDICTED = "engine.predicted"  # the predictor raised or lowered the floor
    # leases (exclusive use of one instance)
    LEASE_ACQUIRED = "lease.acquired"
    LEASE_RELEASED = "lease.released"
    LEASE_EXPIRED = "lease.expired"  # not renewed within its ttl
    LEASE_ENDED = "lease.ended"  # its instance stopped, died or was removed
    ENGINE_ROLLOUT_STARTED = "engine.rollout_started"
    ENGINE_ROLLOUT_FINISHED = "engine.rollout_finished"
    ENGINE_ROLLOUT_FAILED = "engine.rollout_failed"
    REGISTRY_ENTRY_SKIPPED = "registry.entry_skipped"
    # the daemon
    DAEMON_STARTED = "daemon.started"
    DAEMON_STOPPING = "daemon.stopping"
    DAEMON_STOPPED = "daemon.stopped"
    DAEMON_RELOADED = "daemon.reloaded"
    DAEMON_REGISTRY_RESET = "daemon.registry_reset"
    DAEMON_REPLACED_ORPHANS = "daemon.replaced_orphans"
    DAEMON_WRITE_FAILED = "daemon.write_failed"
    DAEMON_WRITE_RECOVERED = "daemon.write_recovered"
    DAEMON_DATABASE_RESET = "daemon.database_reset"


class ScaleCause(StrEnum):
    """Why the autoscaler changed an engine's instance count (`engine.autoscaled` data
    `cause`, and `status`'s last decision)."""

    BURST = "burst"  # requests had to wait
    TARGET = "target"  # the share of busy slots was above scale.target
    FLOOR = "floor"  # below scale.min, the warm pool (min_idle), a prewarm or a prediction
    IDLE = "idle"  # more than demand needed for idle_timeout
    MEMORY = "memory"  # host memory below [daemon.scale] min_available_memory
    LEASE = "lease"  # a lease asked for an instance and none was idle


class DrainCause(StrEnum):
    """Why a failure policy drains and restarts an instance (`instance.draining` data
    `cause`; absent for the drains a person asks for: restart, scale, update, unregister)."""

    MEMORY = "memory"  # RSS above limits.max_rss
    MEMORY_LEAK = "memory_leak"  # RSS growing steadily
    CPU = "cpu"  # CPU above limits.max_cpu_percent, with the policy's action "restart"
    HANG = "hang"  # every slot held by a request unanswered for hang_timeout
    UNHEALTHY = "unhealthy"  # failed health checks, with on_unhealthy = "restart"
