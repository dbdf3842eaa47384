"""The plan of a rollout: which slot is replaced next, how many at once, when a step is done and
when the rollout stops. Kubernetes' RollingUpdate is the model: at most `max_surge` processes
beside the slots' own (successors, and replaced ones still draining), never fewer than
`instances - max_unavailable` serving, each new process gated on its readiness, and a failing
new version stops the rollout.

Plain values in, decisions out: `rollout` describes the engine as a `View` at each change and
carries out the `Plan`; time is the caller's (`now`, monotonic). Imports nothing of the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Phase(Enum):
    """Where one process of a slot is, as the plan needs it."""

    NONE = "none"  # no process (stopped, or waiting in backoff)
    STARTING = "starting"  # on its way: starting, warming, or ready but not passing its check
    SERVING = "serving"  # ready, passing its check; a slot's current one: in dispatch
    STOPPING = "stopping"  # draining or being stopped
    FAILED = "failed"  # exited, crashed or judged failed (a new version that does not start)


@dataclass(frozen=True)
class Proc:
    """One process: its phase, when it was started (monotonic) and, failed, what happened."""

    phase: Phase
    since: float = 0.0
    why: str = ""


@dataclass(frozen=True)
class Slot:
    """One instance slot `NAME#index` of the rollout's engine."""

    index: int
    name: str  # the slot's id, for reasons
    current: Proc
    wanted: bool = True  # wanted running (not stopped, by hand or as an engine)
    due: bool = False  # its current process must be replaced (an older generation, or named)
    successor: Proc | None = None  # a new process started beside it (surge)
    replacing: bool = False  # its process is being replaced in place (drained, then a new one)


@dataclass(frozen=True)
class View:
    """The engine as the plan sees it."""

    slots: tuple[Slot, ...]
    retiring: int = 0  # replaced processes still draining or stopping
    now: float = 0.0


@dataclass(frozen=True)
class Settings:
    """The rollout's limits. `ready_within`: seconds a new process may take to be ready
    (start_seconds + start_timeout); `deadline`: monotonic end of the whole rollout, or None."""

    max_surge: int = 1
    max_unavailable: int = 0
    ready_within: float = 60.0
    deadline: float | None = None


class Move(Enum):
    """What the plan asks for."""

    SURGE = "surge"  # start a successor beside the slot's process
    SWAP = "swap"  # its ready successor takes the slot; the old process retires (drains)
    VACATE = "vacate"  # drain and stop the slot's process, then start the new one in its place
    SETTLED = "settled"  # the slot's in-place replacement is ready: a step is done
    DROP = "drop"  # stop the successor of a slot no longer wanted running
    ABORT = "abort"  # stop the rollout (`reason`); what is on its way is undone
    FINISH = "finish"  # every due slot replaced, nothing left retiring


@dataclass(frozen=True)
class Step:
    """One decision: a move, on a slot (`index`) or the rollout (None), and why."""

    move: Move
    index: int | None = None
    reason: str = ""


@dataclass(frozen=True)
class Plan:
    """The steps to take now, and when to look again at the latest (None: on a change)."""

    steps: tuple[Step, ...]
    wake_at: float | None = None

    @property
    def over(self) -> bool:
        """Whether the rollout ends with this plan (finished or aborted)."""
        return any(s.move in (Move.FINISH, Move.ABORT) for s in self.steps)


def plan(view: View, settings: Settings) -> Plan:
    """The next steps of a rollout over `view`; see the module's header for the rules."""
    now = view.now
    steps: list[Step] = []
    wakes: list[float] = []
    wanted = [s for s in view.slots if s.wanted]
    if settings.deadline is not None:
        if now >= settings.deadline:
            left = [s.name for s in wanted if s.due or s.successor is not None or s.replacing]
            return _abort(f"timed out with {len(left)} instance(s) still to replace")
        wakes.append(settings.deadline)
    for slot in view.slots:
        if slot.successor is not None and not slot.wanted:
            steps.append(Step(Move.DROP, slot.index, f"{slot.name} is not wanted running"))
    busy = 0  # replacements under way
    for slot in wanted:
        new = slot.successor if slot.successor is not None else None
        if new is None and slot.replacing:
            new = slot.current
        if new is None:
            continue
        verdict = _judge(slot, new, settings, now)
        if verdict is not None:
            return _abort(verdict)
        if new.phase is Phase.SERVING:
            move = Move.SWAP if slot.successor is not None else Move.SETTLED
            steps.append(Step(move, slot.index))
        else:
            busy += 1
            if new.phase is Phase.STARTING:
                wakes.append(new.since + settings.ready_within)
    n = len(wanted)
    # The surge is the processes beside the slots' own: successors, and replaced ones still
    # draining. Slots that are down make no room for it (a successor shares its slot's port).
    extra = view.retiring + sum(1 for s in view.slots if s.successor is not None)
    # (a slot replaced in place whose new process serves is settled by this plan: it counts)
    serving = sum(1 for s in wanted if s.current.phase is Phase.SERVING)
    surge_room = settings.max_surge - extra
    down_room = serving - (n - settings.max_unavailable)
    todo = [s for s in wanted if s.due and s.successor is None and not s.replacing]
    # What serves nothing is replaced first: that costs no availability.
    todo.sort(key=lambda s: (s.current.phase is Phase.SERVING, s.index))
    started = 0
    for slot in todo:
        if slot.current.phase is not Phase.SERVING:
            steps.append(Step(Move.VACATE, slot.index, "not serving"))
        elif surge_room > 0:
            steps.append(Step(Move.SURGE, slot.index))
            surge_room -= 1
        elif down_room > 0:
            steps.append(Step(Move.VACATE, slot.index, "within max_unavailable"))
            down_room -= 1
        else:
            break
        started += 1
    done = sum(1 for s in steps if s.move in (Move.SWAP, Move.SETTLED))
    if todo and not started and not busy and not done and not view.retiring:
        return _abort(
            f"cannot replace {todo[0].name}: {serving} of {n} instances serve, and neither a"
            f" surge process (max_surge {settings.max_surge}) nor one more down (max_unavailable"
            f" {settings.max_unavailable}) is allowed"
        )
    if not todo and not busy and not done and not view.retiring and not _dropping(steps):
        steps.append(Step(Move.FINISH))
    return Plan(tuple(steps), min(wakes) if wakes else None)


def _judge(slot: Slot, new: Proc, settings: Settings, now: float) -> str | None:
    """Why the new process of `slot` has failed the rollout, or None."""
    if new.phase in (Phase.FAILED, Phase.NONE):
        return f"{slot.name}: the new process failed: {new.why or 'it exited'}"
    if new.phase is Phase.STARTING and now >= new.since + settings.ready_within:
        return (
            f"{slot.name}: the new process was not ready within {settings.ready_within:g}s"
            " (start_seconds + start_timeout)"
        )
    return None


def _dropping(steps: list[Step]) -> bool:
    return any(s.move is Move.DROP for s in steps)


def _abort(reason: str) -> Plan:
    return Plan((Step(Move.ABORT, None, reason),))
