"""`standby`: what a request that no ready instance can take does (wait, or fail saying why),
decided from plain values (issues 9.7 and 10.17)."""

from __future__ import annotations

from engctl.daemon.standby import InstanceView, Standby, standby


def v(inst: str, state: str, reason: str = "", next_start: float | None = None) -> InstanceView:
    return InstanceView(inst, inst.split("#")[0], state, reason, next_start)


def test_nothing_registered_leaves_the_filters_diagnosis() -> None:
    assert standby([], []) is None


def test_instances_on_their_way_are_waited_for() -> None:
    """Starting, warming up, restarting, or not started yet: wait, saying for what."""
    assert standby([v("slow#0", "restarting", next_start=0.4)], []) == Standby(
        wait="all instances of slow are restarting (next start in 0.4s)"
    )
    both = [v("slow#0", "restarting", next_start=1.25), v("slow#1", "restarting", next_start=0.4)]
    assert standby(both, []) == Standby(
        wait="all instances of slow are restarting (next start in 0.4s)"
    )
    assert standby([v("w#0", "starting"), v("w#1", "starting")], []) == Standby(
        wait="all instances of w are starting"
    )
    mixed = standby([v("w#0", "starting"), v("w#1", "fatal", "gave up")], [])
    assert mixed == Standby(wait="w#0 is starting")


def test_a_ready_match_leaves_the_filters_diagnosis() -> None:
    """Some matching instance serves (isolated, say): the pool's diagnosis says more."""
    assert standby([v("w#0", "ready"), v("w#1", "fatal", "gave up")], []) is None


def test_down_engines_fail_at_once_with_their_reason() -> None:
    assert standby([v("x#0", "fatal", "gave up after 6 failed starts")], []) == Standby(
        error="all instances of x are fatal: gave up after 6 failed starts"
    )
    assert standby([v("x#0", "stopped", "stopped by user"), v("y#0", "fatal", "flapping")], []) == (
        Standby(error="x#0 is stopped: stopped by user; y#0 is fatal: flapping")
    )
    assert standby([v("one", "stopped")], []) == Standby(error="one is stopped")


def test_a_pinned_instance_is_named_alone() -> None:
    """With an instance pinned (or others already tried) the views are not the whole
    engine: no "all instances of"."""
    assert standby([v("kv#1", "restarting", next_start=2.0)], [], whole=False) == Standby(
        wait="kv#1 is restarting (next start in 2.0s)"
    )


def test_service_engines_take_no_requests() -> None:
    assert standby([], ["svc"]) == Standby(error="svc is a service engine: it takes no requests")
    assert standby([], ["b", "a"]) == Standby(
        error="a, b are service engines: they take no requests"
    )
    # A worker of the same type on its way wins over the explanation.
    assert standby([v("w#0", "starting")], ["svc"]) == Standby(
        wait="all instances of w are starting"
    )
