"""Unit tests of the rollout plan (issue 12) as pure decisions over plain values: a small
discrete-event engine (no process, no loop, an injected clock) carries out each plan, and the
rollout's guarantees are checked at every instant: never more than `instances + max_surge`
processes, never fewer than `instances - max_unavailable` serving, every due slot replaced, a
failing new version stops the rollout."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engctl.daemon.rollout_plan import Move, Phase, Plan, Proc, Settings, Slot, View, plan

INF = math.inf


@dataclass
class SimProc:
    """One simulated process: started at `started`, ready at `ready_at`, dead at `fails_at`."""

    started: float
    ready_at: float = 0.0
    fails_at: float = INF

    def phase(self, now: float) -> Phase:
        if now >= self.fails_at:
            return Phase.FAILED
        return Phase.SERVING if now >= self.ready_at else Phase.STARTING


@dataclass
class SimSlot:
    index: int
    current: SimProc | None
    due: bool = True
    wanted: bool = True
    successor: SimProc | None = None
    replacing: bool = False
    vacated_until: float | None = None  # the old process drains and stops until then


@dataclass
class Sim:
    """An engine whose new processes take `start` seconds to be ready (or fail at `fail`
    seconds, or never get ready) and whose replaced ones drain for `drain` seconds."""

    n: int
    start: float = 0.3
    drain: float = 0.1
    fail: float | None = None
    never_ready: bool = False
    now: float = 0.0
    slots: list[SimSlot] = field(default_factory=list)
    retiring: list[float] = field(default_factory=list)  # when each is gone
    plans: list[Plan] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [SimSlot(k, SimProc(0.0)) for k in range(self.n)]

    def new_process(self) -> SimProc:
        ready = INF if self.never_ready else self.now + self.start
        fails = INF if self.fail is None else self.now + self.fail
        return SimProc(self.now, ready, fails)

    def view(self) -> View:
        self.retiring = [t for t in self.retiring if t > self.now]
        slots = []
        for s in self.slots:
            if s.vacated_until is not None:
                current = Proc(Phase.STOPPING)
            elif s.current is None:
                current = Proc(Phase.NONE)
            else:
                current = Proc(s.current.phase(self.now), s.current.started, "exit code 1")
            succ = s.successor
            successor = None if succ is None else Proc(succ.phase(self.now), succ.started, "x")
            slots.append(
                Slot(s.index, f"w#{s.index}", current, s.wanted, s.due, successor, s.replacing)
            )
        return View(tuple(slots), len(self.retiring), self.now)

    def serving(self) -> int:
        return sum(
            1
            for s in self.slots
            if s.vacated_until is None
            and s.current is not None
            and s.current.phase(self.now) is Phase.SERVING
        )

    def processes(self) -> int:
        out = len([t for t in self.retiring if t > self.now])
        for s in self.slots:
            out += s.successor is not None
            out += s.current is not None and s.current.phase(self.now) is not Phase.FAILED
        return out

    def act(self, p: Plan) -> None:
        for step in p.steps:
            if step.index is None:
                continue
            s = self.slots[step.index]
            if step.move is Move.SURGE:
                assert s.successor is None and not s.replacing
                s.successor = self.new_process()
            elif step.move is Move.SWAP:
                assert s.successor is not None
                self.retiring.append(self.now + self.drain)
                s.current, s.successor, s.due = s.successor, None, False
            elif step.move is Move.VACATE:
                assert s.successor is None and not s.replacing
                s.replacing, s.due = True, False
                s.vacated_until = self.now + self.drain
            elif step.move is Move.SETTLED:
                s.replacing = False
            elif step.move is Move.DROP:
                s.successor = None

    def advance(self, wake_at: float | None) -> None:
        """To the next instant anything changes (or the plan's wake-up)."""
        times = [t for t in self.retiring if t > self.now]
        for s in self.slots:
            if s.vacated_until is not None:
                times.append(s.vacated_until)
            for proc in (s.current, s.successor):
                if proc is not None:
                    times += [t for t in (proc.ready_at, proc.fails_at) if self.now < t < INF]
        if wake_at is not None:
            times.append(wake_at)
        assert times, "nothing would ever change: the rollout is stuck"
        self.now = min(times)
        for s in self.slots:
            if s.vacated_until is not None and self.now >= s.vacated_until:
                s.vacated_until = None
                s.current = self.new_process()

    def run(self, settings: Settings, limit: int = 1000) -> Plan:
        """Plan and act until the plan ends the rollout; check the guarantees throughout."""
        floor = self.n - settings.max_unavailable
        for _ in range(limit):
            assert self.serving() >= min(floor, self.n), f"below the floor at {self.now}"
            p = plan(self.view(), settings)
            self.plans.append(p)
            self.act(p)
            assert self.processes() <= self.n + settings.max_surge, f"too many at {self.now}"
            if p.over:
                return p
            if not p.steps:  # (after acting, the executor looks again at once)
                self.advance(p.wake_at)
        raise AssertionError("the rollout never ended")


def ended(p: Plan) -> tuple[Move, str]:
    (last,) = [s for s in p.steps if s.move in (Move.FINISH, Move.ABORT)]
    return last.move, last.reason


def test_one_at_a_time_by_default_replaces_every_slot_in_order() -> None:
    """max_surge 1, max_unavailable 0: one successor at a time, swapped in once ready, slots in
    index order; the rollout ends when the last replaced process has drained."""
    sim = Sim(4, start=0.3, drain=0.1)
    assert ended(sim.run(Settings(1, 0))) == (Move.FINISH, "")
    swaps = [s.index for p in sim.plans for s in p.steps if s.move is Move.SWAP]
    assert swaps == [0, 1, 2, 3]
    assert all(not s.due and s.successor is None for s in sim.slots)
    # each step: 0.3 s to be ready, then 0.1 s of drain before the next surge fits
    assert sim.now == pytest.approx(4 * 0.4)


def test_a_larger_surge_replaces_that_many_at_once() -> None:
    """max_surge 2 starts two successors together: the rollout takes half the steps."""
    sim = Sim(4, start=0.3, drain=0.1)
    sim.run(Settings(2, 0))
    assert sim.now == pytest.approx(2 * 0.4)


def test_no_surge_replaces_in_place_within_max_unavailable() -> None:
    """max_surge 0, max_unavailable 1 (a fixed port per instance): the slot's process drains
    and stops first, then the new one starts in its place; one slot down at a time."""
    sim = Sim(3, start=0.2, drain=0.1)
    assert ended(sim.run(Settings(0, 1))) == (Move.FINISH, "")
    moves = [s.move for p in sim.plans for s in p.steps]
    assert Move.SURGE not in moves and moves.count(Move.VACATE) == 3
    assert moves.count(Move.SETTLED) == 3


def test_recreate_is_every_slot_at_once() -> None:
    """max_unavailable = instances and no surge: the old stop-all-then-start, in one step."""
    sim = Sim(3, start=0.2, drain=0.1)
    sim.run(Settings(0, 3))
    assert [s.move for s in sim.plans[0].steps] == [Move.VACATE] * 3
    assert sim.now == pytest.approx(0.3)


def test_a_new_version_that_crashes_stops_the_rollout_with_the_reason() -> None:
    """A successor that exits stops the rollout; no further slot is touched."""
    sim = Sim(3, start=0.5, fail=0.1)
    move, reason = ended(sim.run(Settings(1, 0)))
    assert move is Move.ABORT
    assert reason == "w#0: the new process failed: x"
    assert all(s.due for s in sim.slots)  # every old process still serves its slot


def test_a_new_version_that_never_gets_ready_stops_at_ready_within() -> None:
    """A successor still starting `ready_within` seconds after its start fails the rollout
    then, not later."""
    sim = Sim(2, never_ready=True)
    move, reason = ended(sim.run(Settings(1, 0, ready_within=2.5)))
    assert move is Move.ABORT
    assert "not ready within 2.5s" in reason
    assert sim.now == pytest.approx(2.5)


def test_the_whole_rollout_timeout_stops_it() -> None:
    """Past the rollout's deadline it stops, saying how many were left."""
    sim = Sim(4, start=1.0)
    move, reason = ended(sim.run(Settings(1, 0, deadline=2.5)))
    assert move is Move.ABORT
    assert reason == "timed out with 2 instance(s) still to replace"


def test_slots_that_serve_nothing_are_replaced_first_at_no_cost() -> None:
    """An old process that is not serving (crashed, still starting) is replaced in place at
    once, whatever the budget: that costs no availability."""
    view = View(
        (
            Slot(0, "w#0", Proc(Phase.SERVING), due=True),
            Slot(1, "w#1", Proc(Phase.FAILED, why="exit code 1"), due=True),
            Slot(2, "w#2", Proc(Phase.STARTING), due=True),
        )
    )
    p = plan(view, Settings(1, 0))
    assert [(s.move, s.index) for s in p.steps] == [
        (Move.VACATE, 1),
        (Move.VACATE, 2),
        (Move.SURGE, 0),
    ]


def test_stuck_without_budget_is_a_failure_that_says_why() -> None:
    """No surge allowed and already at the availability floor (one slot down by itself):
    nothing can ever be replaced, so the rollout stops instead of waiting forever."""
    view = View(
        (
            Slot(0, "w#0", Proc(Phase.NONE), due=False),
            Slot(1, "w#1", Proc(Phase.SERVING), due=True),
        )
    )
    (step,) = plan(view, Settings(0, 1)).steps
    assert step.move is Move.ABORT
    assert step.reason.startswith("cannot replace w#1: 1 of 2 instances serve")


def test_a_successor_of_a_slot_stopped_meanwhile_is_dropped() -> None:
    """`stop w#1` during the rollout: its successor is stopped, the slot left alone."""
    view = View(
        (
            Slot(0, "w#0", Proc(Phase.SERVING), due=False),
            Slot(
                1,
                "w#1",
                Proc(Phase.STOPPING),
                wanted=False,
                due=True,
                successor=Proc(Phase.STARTING),
            ),
        )
    )
    p = plan(view, Settings(1, 0))
    assert [(s.move, s.index) for s in p.steps] == [(Move.DROP, 1)]


def test_nothing_due_finishes_at_once() -> None:
    view = View((Slot(0, "w#0", Proc(Phase.SERVING)),))
    assert [s.move for s in plan(view, Settings(1, 0)).steps] == [Move.FINISH]


def test_retiring_processes_are_waited_for_and_count_against_the_surge() -> None:
    """A replaced process still draining holds the surge place: no new successor yet, and the
    rollout has not finished."""
    view = View(
        (Slot(0, "w#0", Proc(Phase.SERVING)), Slot(1, "w#1", Proc(Phase.SERVING), due=True)),
        retiring=1,
    )
    assert plan(view, Settings(1, 0)).steps == ()


@given(
    n=st.integers(0, 8),
    surge=st.integers(0, 3),
    down=st.integers(0, 3),
    start=st.floats(0.01, 2.0),
    drain=st.floats(0.0, 1.0),
)
def test_every_rollout_keeps_its_bounds_and_replaces_every_slot(
    n: int, surge: int, down: int, start: float, drain: float
) -> None:
    """Whatever the limits (not both 0) and timings: the bounds hold at every instant (checked
    by `Sim.run`) and every slot ends up replaced."""
    if surge == 0 and down == 0:
        surge = 1
    sim = Sim(n, start=start, drain=drain)
    assert ended(sim.run(Settings(surge, down))) == (Move.FINISH, "")
    assert not any(s.due or s.replacing or s.successor for s in sim.slots)
