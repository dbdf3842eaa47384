"""Hooks: deliver events to commands and URLs (`[hooks.NAME]`), off the event loop's path.

Every event reaches `Hooks.event` (an event-log subscriber), which only matches it against each
hook's globs and appends it to that hook's bounded queue (a full queue drops its oldest event,
counted). One task per hook with events to deliver sends them in order and ends when its queue
is empty. A command gets the event JSON on stdin, runs in its own process group (killed with
the group after `timeout`), its output going to the daemon log; at most `hook_max_running`
commands run at once, daemon-wide. A url gets an HTTP POST (Alertmanager's webhook payload for
alerts) with `timeout` per attempt and `retries` more attempts after 0.5 s, 1 s, 2 s, … of
backoff. Nothing a hook does (fail, hang, flood) reaches supervision or dispatch: the hooks
emit no events, and every failure is counted, logged and left there.

Mechanism: knows no policy. Imports `events` (the event record) and `oneshot` (a command's run).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from engctl.alerting import TEST_KIND, HookFormat, HookSpec, event_kinds
from engctl.config import DaemonConfig
from engctl.errors import NotFoundError
from engctl.models import EngineSpec
from engctl.states import EventKind, InstanceState

from . import allow_ssl
from .events import Event
from .oneshot import OneshotRun

log = logging.getLogger("engctl.hooks")

MAX_OUTPUT = 64 * 1024  # bytes of a command's stdout (or a url's answer) kept
SHOWN_OUTPUT = 2048  # ... of which `hooks test` shows this much
BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
_ALERT_KINDS = (EventKind.ALERT_FIRING.value, EventKind.ALERT_RESOLVED.value)
_ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "not ended"


@dataclass
class Delivery:
    """How one event's delivery went (`hooks test` shows it)."""

    ok: bool
    attempts: int = 0
    duration_ms: float = 0.0
    status: int | None = None  # HTTP status of the last attempt
    exit_code: int | None = None
    output: str = ""
    error: str = ""
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "attempts": self.attempts,
            "duration_ms": round(self.duration_ms, 3),
            "status": self.status,
            "exit_code": self.exit_code,
            "output": self.output[:SHOWN_OUTPUT],
            "error": self.error,
            "skipped": self.skipped,
        }


@dataclass
class _Hook:
    spec: HookSpec
    queue: collections.deque[Event] = field(default_factory=collections.deque)
    task: asyncio.Task[None] | None = None
    delivered: int = 0
    failed: int = 0
    dropped: int = 0
    skipped: int = 0
    running: int = 0
    last: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "name": spec.name,
            "on": list(spec.on),
            "command": None if spec.command is None else list(spec.command),
            "url": spec.url,
            "format": spec.format.value if spec.url is not None else None,
            "timeout_s": spec.timeout,
            "retries": spec.retries if spec.url is not None else None,
            "queued": len(self.queue),
            "running": self.running,
            "delivered": self.delivered,
            "failed": self.failed,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "last": self.last,
        }


class _LogLines:
    """A command's stderr and notes, line by line, to the daemon log."""

    def __init__(self, name: str) -> None:
        self.name = name

    def feed(self, stream: str, data: bytes) -> None:
        for line in data.decode(errors="replace").splitlines():
            log.info("hook %s: %s: %s", self.name, stream, line)

    def note(self, text: str) -> None:
        log.debug("hook %s: %s", self.name, text)


class Hooks:
    """Every configured hook, its queue and its counters."""

    def __init__(self, loop: asyncio.AbstractEventLoop, config: DaemonConfig) -> None:
        self.loop = loop
        self.hooks: dict[str, _Hook] = {}
        self.max_queue = config.hook_queue
        self._sem = asyncio.Semaphore(config.hook_max_running)
        self._max_running = config.hook_max_running
        self._closed = False
        self.configure(config)

    def configure(self, config: DaemonConfig) -> None:
        """New settings: hooks that stay keep their queues and counters."""
        old = self.hooks
        self.hooks = {}
        for spec in config.hooks:
            hook = old.pop(spec.name, None) or _Hook(spec)
            hook.spec = spec
            self.hooks[spec.name] = hook
        for gone in old.values():
            gone.queue.clear()  # its task ends after what it sends now
        self.max_queue = config.hook_queue
        if config.hook_max_running != self._max_running:
            self._sem = asyncio.Semaphore(config.hook_max_running)
            self._max_running = config.hook_max_running

    # -- events in ---------------------------------------------------------------------------
    def event(self, ev: Event) -> None:
        """An event was emitted (an event-log subscriber): queue it for the hooks it is for."""
        if self._closed or not self.hooks:
            return
        kinds = kinds_of(ev)
        for hook in self.hooks.values():
            if not hook.spec.wants(kinds):
                continue
            if len(hook.queue) >= self.max_queue:
                hook.queue.popleft()
                hook.dropped += 1
                if hook.dropped == 1 or hook.dropped % 100 == 0:
                    log.warning(
                        "hook %s: %d events dropped (more than hook_queue %d waiting)",
                        hook.spec.name,
                        hook.dropped,
                        self.max_queue,
                    )
            hook.queue.append(ev)
            if hook.task is None:
                hook.task = self.loop.create_task(self._drain(hook))

    async def _drain(self, hook: _Hook) -> None:
        try:
            while hook.queue and not self._closed:
                ev = hook.queue.popleft()
                try:
                    result = await self.deliver(hook, ev)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a hook must never take the daemon down
                    log.exception("hook %s failed", hook.spec.name)
                    result = Delivery(False, error=f"{type(exc).__name__}: {exc}")
                self._count(hook, ev, result)
        finally:
            hook.task = None

    def _count(self, hook: _Hook, ev: Event, result: Delivery) -> None:
        if result.skipped:
            hook.skipped += 1
        elif result.ok:
            hook.delivered += 1
        else:
            hook.failed += 1
            log.warning("hook %s: %s (event %s %d)", hook.spec.name, result.error, ev.kind, ev.id)
        hook.last = {
            "at": round(time.time(), 3),
            "event_id": ev.id,
            "kind": ev.kind,
            **result.to_json(),
        }

    # -- delivery ------------------------------------------------------------------------------
    async def deliver(self, hook: _Hook, ev: Event) -> Delivery:
        """Deliver one event through `hook` now (its command or its url)."""
        spec = hook.spec
        started = time.perf_counter()
        hook.running += 1
        try:
            if spec.command is not None:
                async with self._sem:
                    result = await self._run(spec, ev)
            else:
                result = await self._post(spec, ev)
        finally:
            hook.running -= 1
        result.duration_ms = (time.perf_counter() - started) * 1000
        return result

    async def _run(self, spec: HookSpec, ev: Event) -> Delivery:
        assert spec.command is not None
        fut: asyncio.Future[Delivery] = self.loop.create_future()

        def done(ok: bool, result: Any, error: str) -> None:
            text = result if isinstance(result, str) else json.dumps(result)
            if ok and text:
                for line in text.splitlines()[:50]:
                    log.info("hook %s: stdout: %s", spec.name, line)
            if not fut.done():
                fut.set_result(Delivery(ok, 1, output=text if ok else "", error=error))

        env = dict(os.environ)
        env["ENGCTL_HOOK"] = spec.name
        env["ENGCTL_EVENT_KIND"] = ev.kind
        run_spec = EngineSpec(name=f"hook-{spec.name}", command=spec.command)
        payload = json.dumps(ev.to_json()) + "\n"
        run = OneshotRun(
            run_spec,
            payload,
            env,
            self.loop,
            done,
            max_stdout=MAX_OUTPUT,
            timeout=spec.timeout,
            log=_LogLines(spec.name),
            label=f"hook {spec.name}",
        )
        try:
            result = await fut
        except asyncio.CancelledError:
            run.kill()
            raise
        if not result.ok and result.error.startswith("exit code"):
            with contextlib.suppress(ValueError, IndexError):
                result.exit_code = int(result.error.split()[2].rstrip(":"))
        elif result.ok:
            result.exit_code = 0
        return result

    async def _post(self, spec: HookSpec, ev: Event) -> Delivery:
        assert spec.url is not None
        body = payload(spec, ev)
        if body is None:
            return Delivery(True, skipped=True, error=f"{spec.format.value} posts alerts only")
        result = Delivery(False)
        delay = BACKOFF_INITIAL
        for attempt in range(spec.retries + 1):
            result.attempts = attempt + 1
            try:
                status, answer = await post(spec.url, body, spec.timeout)
            except TimeoutError:
                result.error = f"POST {spec.url}: no answer within {spec.timeout:g}s"
            except OSError as exc:
                result.error = f"POST {spec.url}: {exc.strerror or exc}"
            else:
                result.status, result.output = status, answer
                if 200 <= status < 300:
                    result.ok, result.error = True, ""
                    return result
                result.error = f"POST {spec.url}: HTTP {status}"
                if 400 <= status < 500 and status not in (408, 429):
                    return result  # the receiver refuses this payload: retrying will not help
            if attempt < spec.retries and not self._closed:
                await asyncio.sleep(delay)
                delay = min(BACKOFF_MAX, delay * 2)
        return result

    # -- the test ---------------------------------------------------------------------------
    async def test(self, name: str) -> dict[str, Any]:
        """`hooks test NAME`: deliver a synthetic event through the hook now; what happened."""
        hook = self.hooks.get(name)
        if hook is None:
            known = ", ".join(sorted(self.hooks)) or "none configured"
            raise NotFoundError(
                f"no hook {name!r} (hooks: {known}; see [hooks.NAME] in config.toml)"
            )
        ev = synthetic_event(hook.spec)
        result = await self.deliver(hook, ev)
        self._count(hook, ev, result)
        return {"hook": name, "event": ev.to_json(), **result.to_json()}

    def to_json(self) -> dict[str, Any]:
        """`hooks.list`: every hook with its queue and counters."""
        return {
            "hooks": [h.to_json() for h in self.hooks.values()],
            "max_running": self._max_running,
            "queue": self.max_queue,
        }

    def close(self) -> None:
        """Daemon shutdown: queued events are dropped, deliveries under way cancelled."""
        self._closed = True
        for hook in self.hooks.values():
            hook.queue.clear()
            if hook.task is not None:
                hook.task.cancel()


def synthetic_event(spec: HookSpec) -> Event:
    """An event a hook is on, marked as a test: `alert.firing` when it takes alerts, else the
    first kind its globs match."""
    kinds = event_kinds()
    kind = next((k for k in kinds if spec.wants((k,))), TEST_KIND)
    if spec.wants((EventKind.ALERT_FIRING.value,)):
        kind = EventKind.ALERT_FIRING.value
    data: dict[str, Any] = {"test": True}
    to_state = None
    if kind.startswith("alert."):
        now = time.time()
        data.update(
            {
                "name": "engctl-test",
                "state": "firing" if kind != EventKind.ALERT_RESOLVED else "resolved",
                "severity": "info",
                "labels": {"engine": "test"},
                "value": 1.0,
                "threshold": 0.0,
                "expr": "test",
                "for_s": 0.0,
                "since": round(now, 3),
                "fired_at": round(now, 3),
                "summary": "a test of the hook (engctl hooks test)",
                "builtin": False,
            }
        )
    elif kind.startswith("instance.") and kind.split(".", 1)[1] in _STATES:
        to_state, kind = kind.split(".", 1)[1], EventKind.INSTANCE_STATE.value
    return Event(
        0,
        time.time(),
        kind,
        f"engctl hooks test {spec.name}: a synthetic event",
        engine="test",
        to_state=to_state,
        data=data,
    )


_STATES = {s.value for s in InstanceState}


def payload(spec: HookSpec, ev: Event) -> bytes | None:
    """The body a url hook posts for `ev` (None: this format has nothing to post for it)."""
    alert = ev.kind in _ALERT_KINDS and isinstance(ev.data, dict) and "name" in ev.data
    if spec.format is HookFormat.EVENT or (spec.format is HookFormat.WEBHOOK and not alert):
        return json.dumps(ev.to_json()).encode()
    if not alert:
        return None
    am = _am_alert(ev)
    if spec.format is HookFormat.ALERTMANAGER:
        return json.dumps([am]).encode()
    data = ev.data or {}
    return json.dumps(
        {
            "version": "4",
            "groupKey": f"engctl:{data.get('name')}",
            "truncatedAlerts": 0,
            "status": am["status"],
            "receiver": spec.name,
            "groupLabels": {"alertname": data.get("name")},
            "commonLabels": am["labels"],
            "commonAnnotations": am["annotations"],
            "externalURL": "",
            "alerts": [am],
        }
    ).encode()


def _rfc3339(at: float | None) -> str:
    if at is None:
        return _ZERO_TIME
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _am_alert(ev: Event) -> dict[str, Any]:
    """One alert in Alertmanager's shape (labels, annotations, startsAt, endsAt, …)."""
    data = ev.data or {}
    resolved = ev.kind == EventKind.ALERT_RESOLVED
    labels = {"alertname": str(data.get("name")), "severity": str(data.get("severity"))}
    labels.update({str(k): str(v) for k, v in (data.get("labels") or {}).items()})
    import hashlib  # here: it loads OpenSSL (~3.5 MiB of RSS), for Alertmanager hooks only

    fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "status": "resolved" if resolved else "firing",
        "labels": labels,
        "annotations": {
            "summary": str(data.get("summary") or data.get("expr") or ""),
            "description": ev.reason,
            "value": str(data.get("value")),
            "threshold": str(data.get("threshold")),
        },
        "startsAt": _rfc3339(data.get("fired_at") or data.get("since")),
        "endsAt": _rfc3339(ev.at) if resolved else _ZERO_TIME,
        "generatorURL": "",
        "fingerprint": fingerprint,
    }


async def post(url: str, body: bytes, timeout: float) -> tuple[int, str]:
    """POST `body` as JSON to `url`; the HTTP status and the start of the answer's body."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if tls else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    ssl_ctx: Any = None
    if tls:
        allow_ssl()  # the daemon blocks ssl to save memory (see __main__): an https hook pays
        import ssl

        ssl_ctx = ssl.create_default_context()
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, ssl=ssl_ctx)
        try:
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: engctl-hook\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            status_line = await reader.readline()
            length = None
            while True:
                line = await reader.readline()
                if not line.strip():
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length" and value.strip().isdigit():
                    length = int(value.strip())
            want = MAX_OUTPUT if length is None else min(length, MAX_OUTPUT)
            answer = await reader.read(want) if want else b""
        finally:
            writer.close()
    fields = status_line.decode("latin-1").split()
    if len(fields) < 2 or not fields[1].isdigit():
        raise OSError(f"not an HTTP answer: {status_line[:60]!r}")
    return int(fields[1]), answer.decode(errors="replace")


def kinds_of(ev: Event) -> tuple[str, ...]:
    """The kinds a hook may know `ev` by."""
    if ev.kind == EventKind.INSTANCE_STATE and ev.to_state:
        return (ev.kind, f"instance.{ev.to_state}")
    return (ev.kind,)
