"""Hooks without a daemon: a full queue drops the oldest event and counts it, a hook hears only
the kinds its globs match (state changes also as `instance.<state>`), and the url payload has
Alertmanager's webhook shape for alerts."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from engctl.alerting import HookSpec, parse_hooks
from engctl.config import DaemonConfig
from engctl.daemon.events import Event
from engctl.daemon.hooks import Hooks, kinds_of, payload


def _config(**hooks: dict[str, object]) -> DaemonConfig:
    return replace(DaemonConfig(), hooks=parse_hooks(hooks, (), "hooks"), hook_queue=2)


def test_a_full_hook_queue_drops_the_oldest_events_and_counts_them() -> None:
    async def run() -> dict[str, object]:
        hooks = Hooks(asyncio.get_running_loop(), _config(slow={"on": ["*"], "command": ["true"]}))
        for n in range(5):  # the drain task has not run yet: all five meet a queue of two
            hooks.event(Event(n, 0.0, "engine.registered", "x"))
        doc: dict[str, object] = hooks.to_json()["hooks"][0]
        hooks.close()
        return doc

    doc = asyncio.run(run())
    assert doc["dropped"] == 3 and doc["queued"] == 2


def test_hooks_match_event_kinds_and_state_pseudo_kinds() -> None:
    [spec] = parse_hooks({"h": {"on": ["instance.fatal", "alert.*"], "command": "x"}}, (), "h")
    fatal = Event(1, 0.0, "instance.state", "gave up", to_state="fatal")
    assert kinds_of(fatal) == ("instance.state", "instance.fatal")
    assert spec.wants(kinds_of(fatal))
    assert spec.wants(("alert.resolved",)) and not spec.wants(("engine.registered",))


def test_url_hook_posts_alerts_in_alertmanager_webhook_shape() -> None:
    spec = HookSpec("am", ("alert.*",), url="http://127.0.0.1:9/")
    data = {"name": "slow", "severity": "critical", "labels": {"engine": "web"}, "value": 3.0,
            "threshold": 1.0, "summary": "", "since": 1.0, "fired_at": 2.0}  # fmt: skip
    body = payload(spec, Event(7, 2.0, "alert.firing", "slow firing", data=data))
    assert body is not None
    doc = json.loads(body)
    assert doc["version"] == "4" and doc["status"] == "firing"
    assert doc["alerts"][0]["labels"] == {
        "alertname": "slow",
        "severity": "critical",
        "engine": "web",
    }
    other = payload(spec, Event(8, 2.0, "engine.registered", "x"))
    assert other is not None and json.loads(other)["kind"] == "engine.registered"
