"""A first end-to-end check: the daemon supervises a real process and reports it."""

from __future__ import annotations

from tests.conftest import Home, engine_cmd


def test_register_start_status_stop(daemon: Home) -> None:
    """A registered service reaches ready, shows a pid, and stops on request."""
    daemon.register("s", engine_cmd("sleeper.py"), mode="service", restart={"start_seconds": 0.2})
    inst = daemon.wait_state("s#0", "ready")
    assert inst["pid"] > 0
    r = daemon.cli("stop", "s")
    assert r.returncode == 0, r.stderr
    assert daemon.instance("s#0")["state"] == "stopped"
