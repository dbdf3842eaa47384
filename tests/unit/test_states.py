"""Unit tests of the lifecycle table and the restart policy decisions."""

from __future__ import annotations

import pytest

from engctl.states import TRANSITIONS, EngineMode, InstanceState, RestartPolicy, can_transition

S = InstanceState


def test_every_state_has_an_entry() -> None:
    """The transition table has a row for every state and mentions only states."""
    assert set(TRANSITIONS) == set(InstanceState)
    for targets in TRANSITIONS.values():
        assert targets <= set(InstanceState)


def test_no_state_transitions_to_itself() -> None:
    """A self-edge would hide a missing state change, so none exists."""
    for state, targets in TRANSITIONS.items():
        assert state not in targets


def test_every_state_is_reachable_from_stopped() -> None:
    """Walking the edges from stopped reaches every state but busy (shown, never entered)."""
    seen, todo = {S.STOPPED}, [S.STOPPED]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    assert seen == set(InstanceState) - {S.BUSY}


def test_stopping_only_goes_to_stopped() -> None:
    """Once asked to stop, an instance can only end stopped."""
    assert TRANSITIONS[S.STOPPING] == frozenset({S.STOPPED})


def test_stopped_only_goes_to_starting() -> None:
    """A stopped instance leaves that state only by starting."""
    assert TRANSITIONS[S.STOPPED] == frozenset({S.STARTING})


@pytest.mark.parametrize("state", [S.FATAL, S.EXITED, S.BACKOFF])
def test_resting_states_can_start_again_or_stop(state: InstanceState) -> None:
    """Fatal, exited and backoff instances can be started again or stopped."""
    assert can_transition(state, S.STARTING)
    assert can_transition(state, S.STOPPED)


@pytest.mark.parametrize("state", [S.STARTING, S.WARMING, S.READY])
def test_states_with_a_process_can_be_stopped_or_exit(state: InstanceState) -> None:
    """Any state with a live process can stop, back off, exit or give up."""
    for target in (S.STOPPING, S.BACKOFF, S.EXITED, S.FATAL):
        assert can_transition(state, target)


def test_busy_is_a_display_state_no_edge_enters() -> None:
    """Busy is shown for a full ready instance, never entered (issue 11): no edge leads to it
    or from it; starting is not a way into ready either without the process."""
    assert not any(can_transition(s, S.BUSY) for s in InstanceState)
    assert TRANSITIONS[S.BUSY] == frozenset()
    assert not can_transition(S.STOPPED, S.READY)


def test_process_and_running_flags() -> None:
    """has_process covers starting to stopping; is_running only warming, ready, busy."""
    with_process = {S.STARTING, S.WARMING, S.READY, S.BUSY, S.STOPPING}
    assert {s for s in InstanceState if s.has_process} == with_process
    assert {s for s in InstanceState if s.is_running} == {S.WARMING, S.READY, S.BUSY}


def test_only_oneshot_is_not_long_running() -> None:
    """Worker and service keep processes up; oneshot does not."""
    assert [m for m in EngineMode if not m.long_running] == [EngineMode.ONESHOT]


@pytest.mark.parametrize(
    ("policy", "code", "expected", "restart"),
    [
        (RestartPolicy.ALWAYS, 0, False, True),
        (RestartPolicy.ALWAYS, 1, False, True),
        (RestartPolicy.ALWAYS, None, False, True),
        (RestartPolicy.ALWAYS, 1, True, False),
        (RestartPolicy.ON_FAILURE, 0, False, False),
        (RestartPolicy.ON_FAILURE, 1, False, True),
        (RestartPolicy.ON_FAILURE, -1, False, True),
        (RestartPolicy.ON_FAILURE, None, False, True),
        (RestartPolicy.ON_FAILURE, 1, True, False),
        (RestartPolicy.ON_FAILURE, None, True, False),
        (RestartPolicy.NEVER, 0, False, False),
        (RestartPolicy.NEVER, 1, False, False),
        (RestartPolicy.NEVER, None, False, False),
        (RestartPolicy.NEVER, 1, True, False),
    ],
)
def test_wants_restart_truth_table(
    policy: RestartPolicy, code: int | None, expected: bool, restart: bool
) -> None:
    """Expected exits never restart; always restarts the rest; on-failure skips exit code 0."""
    assert policy.wants_restart(code, expected) is restart


def test_wire_values_are_stable() -> None:
    """States and policies are spelled on the wire as documented."""
    assert [s.value for s in InstanceState] == [
        "stopped",
        "starting",
        "warming",
        "ready",
        "busy",
        "stopping",
        "backoff",
        "exited",
        "fatal",
    ]
    assert RestartPolicy("on-failure") is RestartPolicy.ON_FAILURE
