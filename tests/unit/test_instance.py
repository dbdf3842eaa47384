"""The runtime record of an instance (`engctl.daemon.instance`): the state `status` shows, and
the time spent in each state on the injected clock. No process, no loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engctl.daemon.instance import Engine, Instance
from engctl.daemon.logs import InstanceLog
from engctl.models import EngineSpec
from engctl.states import DesiredState, InstanceState

S = InstanceState


def make_instance(tmp_path: Path, clock: Callable[[], float], max_concurrency: int = 2) -> Instance:
    spec = EngineSpec.from_dict("w", {"command": ["true"], "max_concurrency": max_concurrency})
    engine = Engine(spec, DesiredState.RUNNING)
    log = InstanceLog(tmp_path / "w.0.log", 1 << 20, 1)
    return Instance(engine, 0, log, clock)


def test_busy_is_shown_for_a_ready_instance_with_every_slot_taken(tmp_path: Path) -> None:
    """`busy` is derived from the in-flight count (issue 11): the state stays `ready`, status
    shows `busy` while every slot is taken, and `ready` again once one frees up."""
    inst = make_instance(tmp_path, lambda: 0.0, max_concurrency=2)
    inst.state = S.READY
    inst.stats.in_flight = 1
    assert inst.to_json()["state"] == "ready"
    inst.stats.in_flight = 2
    assert inst.to_json()["state"] == "busy"
    assert inst.state is S.READY
    inst.stats.in_flight = 0
    assert inst.to_json()["state"] == "ready"
    inst.state, inst.stats.in_flight = S.STOPPING, 2
    assert inst.to_json()["state"] == "stopping"  # only a ready instance is ever shown busy


def test_state_seconds_count_on_the_injected_clock(tmp_path: Path) -> None:
    """Time in each state is measured with the clock the supervisor injects."""
    now = [100.0]  # a monotonic clock the test moves by hand
    inst = make_instance(tmp_path, lambda: now[0])
    now[0] += 5.0
    inst.entered(S.STOPPED)
    inst.state = S.STARTING
    now[0] += 1.5
    assert inst.state_seconds() == {"stopped": 5.0, "starting": 1.5}


def test_an_instance_keeps_its_attributes_in_slots(tmp_path: Path) -> None:
    """Issue 13 (memory): an instance's ~45 attributes live in slots, not in a dict of
    1.5 KiB each (past the 30 keys a shared-key dict holds): no dict, and nothing set on it
    that its slots do not name."""
    inst = make_instance(tmp_path, lambda: 0.0)
    assert not hasattr(inst, "__dict__")
    for name in Instance.__slots__:
        assert hasattr(inst, name), f"{name} is never set in __init__"
    # Every slot is needed: each names an attribute the daemon's code sets.
    import ast
    import inspect

    from engctl.daemon import instance

    tree = ast.parse(inspect.getsource(instance))
    assigned = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
    }
    assert set(Instance.__slots__) <= assigned | {"_role"}
