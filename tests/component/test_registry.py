"""Registry semantics: unchanged, updated in place, restarted, scaled, apply/prune, unregister."""

from __future__ import annotations

import json
from typing import Any

import pytest

from engctl.errors import EngctlError, EngineNotFoundError, SpecError
from tests.conftest import Home, engine_cmd, wait_until
from tests.daemon_support import all_ready, engine_processes, gone

QUICK = {"start_seconds": 0.2}


def _spec(**extra: Any) -> dict[str, Any]:
    return {
        "command": engine_cmd("sleeper.py"),
        "mode": "service",
        "restart": dict(QUICK),
        **extra,
    }


def _register(home: Home, name: str, **extra: Any) -> dict[str, Any]:
    with home.client() as c:
        result = c.register({name: _spec(**extra)})
    assert len(result["engines"]) == 1
    return result["engines"][0]  # type: ignore[no-any-return]


def _pids(home: Home, name: str, n: int) -> dict[str, int]:
    insts = wait_until(lambda: all_ready(home, name, n), 20)
    return {i["id"]: i["pid"] for i in insts}


def _registry_file(home: Home) -> dict[str, Any]:
    doc = json.loads(home.paths.registry.read_text())
    assert isinstance(doc, dict)
    return doc


def test_registering_the_same_spec_again_is_unchanged(daemon: Home) -> None:
    """Registering an identical spec reports "unchanged" and leaves the processes alone."""
    assert _register(daemon, "s", instances=2)["action"] == "created"
    pids = _pids(daemon, "s", 2)
    again = _register(daemon, "s", instances=2)
    assert again["action"] == "unchanged"
    assert _pids(daemon, "s", 2) == pids


def test_spelling_defaults_out_is_the_same_spec(daemon: Home) -> None:
    """A spec that spells out default values equals the one that leaves them out."""
    _register(daemon, "s")
    pids = _pids(daemon, "s", 1)
    same = _register(
        daemon, "s", instances=1, weight=1.0, type="generic", stop={"signal": "TERM"}, labels={}
    )
    assert same["action"] == "unchanged"
    assert _pids(daemon, "s", 1) == pids


def test_changing_weight_and_labels_updates_in_place(daemon: Home) -> None:
    """A change of weight or labels only is applied without restarting any process."""
    _register(daemon, "s", instances=2)
    pids = _pids(daemon, "s", 2)
    result = _register(daemon, "s", instances=2, weight=3.5, labels={"tier": "gold"})
    assert result["action"] == "updated"
    assert result["changed"] == ["labels", "weight"]
    assert result["detail"] == "updated in place"
    assert _pids(daemon, "s", 2) == pids
    with daemon.client() as c:
        listed = c.call("engine.list")["engines"][0]
    assert (listed["weight"], listed["labels"]) == (3.5, {"tier": "gold"})
    assert _registry_file(daemon)["engines"]["s"]["spec"]["weight"] == 3.5


def test_changing_command_restarts_with_new_pids(daemon: Home) -> None:
    """A changed command replaces every process (rolled out, issue 12): new pids, the old ones
    gone."""
    _register(daemon, "s", instances=2)
    old = _pids(daemon, "s", 2)
    result = _register(daemon, "s", instances=2, command=[*engine_cmd("sleeper.py"), "--changed"])
    assert result["action"] == "updated"
    assert result["changed"] == ["command"]
    assert result["detail"] == "rolled out generation 2: 2 replaced"
    new = _pids(daemon, "s", 2)
    assert set(new) == set(old)
    assert not set(new.values()) & set(old.values())
    wait_until(lambda: all(gone(p) for p in old.values()), 15)
    assert engine_processes(daemon) == set(new.values())


def test_changing_instances_scales_and_keeps_existing_pids(daemon: Home) -> None:
    """Raising then lowering `instances` adds and removes the highest instances only."""
    _register(daemon, "s", instances=2)
    two = _pids(daemon, "s", 2)
    up = _register(daemon, "s", instances=3)
    assert up["action"] == "updated"
    assert up["changed"] == ["instances"]
    assert "2 -> 3" in up["detail"]
    three = _pids(daemon, "s", 3)
    assert {k: three[k] for k in two} == two
    down = _register(daemon, "s", instances=1)
    assert "3 -> 1" in down["detail"]
    one = _pids(daemon, "s", 1)
    assert one == {"s#0": two["s#0"]}
    wait_until(lambda: gone(three["s#1"]) and gone(three["s#2"]), 15)
    assert engine_processes(daemon) == {two["s#0"]}


def test_scale_call_keeps_existing_pids(daemon: Home) -> None:
    """engine.scale grows an engine without touching the instances it has."""
    _register(daemon, "s")
    one = _pids(daemon, "s", 1)
    with daemon.client() as c:
        assert c.scale("s", 2)["instances"] == 2
    two = _pids(daemon, "s", 2)
    assert two["s#0"] == one["s#0"]
    assert _registry_file(daemon)["engines"]["s"]["spec"]["instances"] == 2


def test_export_then_apply_is_a_noop(daemon: Home, tmp_path: Any) -> None:
    """`export` then `apply -f` of its output changes nothing and restarts nothing."""
    rich = _spec(
        type="onnx",
        instances=2,
        capabilities=["fp32", "batch"],
        labels={"tier": "gold", "creator": "scriptis"},
        weight=2.5,
        env={"OMP_NUM_THREADS": "1"},
        cwd="/tmp",
        stop={"signal": "SIGINT", "timeout": 3.0},
        limits={"max_rss": "512MiB", "max_cpu_percent": 95.0},
        restart={
            "policy": "always",
            "start_seconds": 0.2,
            "max_retries": 3,
            "backoff": {"initial": 0.1, "factor": 3.0, "max": 5.0},
        },
    )
    with daemon.client() as c:
        c.register({"base": _spec(), "rich": {**rich, "depends_on": ["base"]}})
    pids = {**_pids(daemon, "base", 1), **_pids(daemon, "rich", 2)}
    out = tmp_path / "engines.toml"
    r = daemon.cli("export", "-o", str(out))
    assert r.returncode == 0, r.stderr
    r = daemon.cli("apply", "-f", str(out), "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert sorted((e["name"], e["action"]) for e in result["engines"]) == [
        ("base", "unchanged"),
        ("rich", "unchanged"),
    ]
    assert result["removed"] == []
    assert {**_pids(daemon, "base", 1), **_pids(daemon, "rich", 2)} == pids
    # Text output says the same, and stdout export is the file's content.
    r = daemon.cli("apply", "-f", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["unchanged base (same spec)", "unchanged rich (same spec)"]
    assert daemon.cli("export").stdout == out.read_text()


def test_apply_prune_removes_engines_not_in_the_file(daemon: Home, tmp_path: Any) -> None:
    """`apply --prune` unregisters (and stops) every engine the file does not name."""
    for name in ("a", "b", "c"):
        _register(daemon, name)
    a, b, c = (_pids(daemon, n, 1) for n in ("a", "b", "c"))
    path = tmp_path / "only-a.toml"
    r = daemon.cli("export", "a", "-o", str(path))
    assert r.returncode == 0, r.stderr
    r = daemon.cli("apply", "-f", str(path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["unchanged a (same spec)"]
    assert len(daemon.status()["engines"]) == 3
    r = daemon.cli("apply", "-f", str(path), "--prune", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert sorted(result["removed"]) == ["b", "c"]
    assert [e["name"] for e in daemon.status()["engines"]] == ["a"]
    assert _pids(daemon, "a", 1) == a
    wait_until(lambda: gone(b["b#0"]) and gone(c["c#0"]), 15)
    assert sorted(_registry_file(daemon)["engines"]) == ["a"]


def test_unregister_stops_processes_and_forgets_the_engine(daemon: Home) -> None:
    """`unregister` stops every instance of the engine and removes it from the registry file."""
    _register(daemon, "gone", instances=2)
    _register(daemon, "stay")
    pids = _pids(daemon, "gone", 2)
    r = daemon.cli("unregister", "gone")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "unregistered: gone"
    assert all(gone(p) for p in pids.values())
    assert [e["name"] for e in daemon.status()["engines"]] == ["stay"]
    assert sorted(_registry_file(daemon)["engines"]) == ["stay"]
    with daemon.client() as c:
        kinds = [e["kind"] for e in c.events(engine="stay", limit=1000)]
        assert "engine.registered" in kinds
        with pytest.raises(EngineNotFoundError):
            c.unregister(["gone"])


def test_unregister_of_an_engine_and_its_dependents_together(daemon: Home) -> None:
    """A dependency alone cannot be unregistered, but it can together with its dependents."""
    _register(daemon, "db")
    _register(daemon, "app", depends_on=["db"])
    r = daemon.cli("unregister", "db")
    assert r.returncode == 2
    assert "'app' depends on it" in r.stderr
    assert sorted(e["name"] for e in daemon.status()["engines"]) == ["app", "db"]
    r = daemon.cli("unregister", "db", "app")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "unregistered: app, db"  # dependents go first
    assert daemon.status()["engines"] == []


def test_unregister_of_an_unknown_engine_removes_nothing(daemon: Home) -> None:
    """Unregistering a known and an unknown engine together fails and keeps the known one."""
    _register(daemon, "a")
    with daemon.client() as c, pytest.raises(EngineNotFoundError, match="known: a"):
        c.unregister(["a", "nope"])
    assert [e["name"] for e in daemon.status()["engines"]] == ["a"]


@pytest.mark.parametrize(
    "bad",
    [
        {"command": ["x"], "instances": -1},
        {"command": ["x"], "color": "blue"},
        {"command": ["x"], "depends_on": ["missing"]},
    ],
    ids=["range", "unknown-key", "unknown-dependency"],
)
def test_a_bad_spec_in_a_batch_applies_nothing(daemon: Home, bad: dict[str, Any]) -> None:
    """A batch with one invalid engine is refused whole: the valid engine is not registered."""
    with daemon.client() as c, pytest.raises(SpecError):
        c.register({"good": _spec(), "bad": bad})
    assert daemon.status()["engines"] == []
    assert not daemon.paths.registry.exists() or _registry_file(daemon)["engines"] == {}


def test_dependency_cycle_is_refused_with_its_path(daemon: Home) -> None:
    """A dependency cycle is refused and the error names the cycle."""
    with daemon.client() as c, pytest.raises(SpecError, match="a -> b -> a"):
        c.register({"a": _spec(depends_on=["b"]), "b": _spec(depends_on=["a"])})
    assert daemon.status()["engines"] == []


def test_registry_survives_a_graceful_restart(daemon: Home) -> None:
    """After `daemon stop` the next daemon brings every engine back with its wishes."""
    _register(daemon, "run", instances=2)
    _register(daemon, "off")
    _pids(daemon, "run", 2)
    with daemon.client() as c:
        c.stop(["off", "run#1"])
        exported = c.call("engine.export")
    r = daemon.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr
    r = daemon.cli("daemon", "start")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: daemon.instance("run#0")["state"] == "ready", 20)
    st = {e["name"]: e for e in daemon.status()["engines"]}
    assert st["off"]["desired"] == "stopped"
    assert [i["state"] for i in st["off"]["instances"]] == ["stopped"]
    assert daemon.instance("run#1")["state"] == "stopped"
    with daemon.client() as c:
        assert c.call("engine.export") == exported
    assert engine_processes(daemon) == {daemon.instance("run#0")["pid"]}


def test_client_errors_are_typed(daemon: Home) -> None:
    """Errors from the daemon come back to the Python client as EngctlError subclasses."""
    with daemon.client() as c:
        with pytest.raises(EngineNotFoundError) as info:
            c.stop(["nope"])
        assert isinstance(info.value, EngctlError)
        assert info.value.exit_code == 7
