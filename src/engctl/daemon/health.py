"""Health probes: `ping` (worker protocol), `command:<argv>`, `http:<url>`, `tcp:<host:port>`.

One probe is one coroutine that returns (passed, detail) within its timeout; it never raises.
Scheduling, thresholds and what follows from them belong to `enforcer` and `policies`.

Mechanism: imports `process` and `oneshot` only, never a policy module.
"""

from __future__ import annotations

import asyncio
import os
import shlex
from collections.abc import Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

from engctl.models import EngineSpec, split_instance_id

from . import allow_ssl, process
from .oneshot import OneshotRun

ProbeResult = tuple[bool, str]
# Pings a worker: `ping(on_answer)` sends one and calls on_answer() when it is answered.
PingSender = Callable[[Callable[[], None]], None]
# A check command's output is not read, only its exit code: a bound for its stdout.
MAX_PROBE_OUTPUT = 16 * 1024 * 1024


async def ping_probe(send: PingSender | None, timeout: float) -> ProbeResult:
    """A worker-protocol ping answered within `timeout`."""
    if send is None:
        return False, "no protocol channel"
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def answered() -> None:
        if not fut.done():
            fut.set_result(None)

    send(answered)
    try:
        await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        return False, f"no answer to ping within {timeout:g}s"
    return True, "answered ping"


async def command_probe(
    spec: EngineSpec, argv_text: str, env: dict[str, str], timeout: float
) -> ProbeResult:
    """A command (run in the engine's cwd and env) that exits 0 within `timeout`."""
    try:
        argv = tuple(shlex.split(argv_text))
    except ValueError as exc:
        return False, f"cannot split the check command: {exc}"
    if not argv:
        return False, "empty check command"
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[ProbeResult] = loop.create_future()

    def done(ok: bool, result: Any, error: str) -> None:
        if not fut.done():
            fut.set_result((True, "command exited 0") if ok else (False, error))

    # A oneshot run is exactly this: spawn, collect, kill the group at the deadline.
    check_spec = replace(spec, command=argv, shell=False)
    OneshotRun(check_spec, "", env, loop, done, max_stdout=MAX_PROBE_OUTPUT, timeout=timeout)
    return await fut


async def http_probe(url: str, timeout: float) -> ProbeResult:
    """An HTTP GET answered with a 2xx or 3xx status within `timeout`."""
    if url.startswith("http:") and not url.startswith("http://"):
        url = url.removeprefix("http:")  # "http:http://..." and "http:localhost:80/x"
        if "://" not in url:
            url = "http://" + url
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        return False, f"bad port in {url!r}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        async with asyncio.timeout(timeout):
            ssl_ctx: Any = None
            if tls:
                ssl_ctx = _ssl_context()
            reader, writer = await asyncio.open_connection(host, port, ssl=ssl_ctx)
            try:
                writer.write(
                    f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                    "User-Agent: engctl-health\r\nConnection: close\r\n\r\n".encode()
                )
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return False, f"GET {url}: no answer within {timeout:g}s"
    except OSError as exc:
        return False, f"GET {url}: {_os_error(exc)}"
    fields = status_line.decode("latin-1").split()
    if len(fields) < 2 or not fields[1].isdigit():
        return False, f"GET {url}: not an HTTP answer: {status_line[:60]!r}"
    code = int(fields[1])
    return (200 <= code < 400), f"GET {url}: HTTP {code}"


def _ssl_context() -> Any:
    # The daemon blocks the ssl import to save memory (see __main__); an https check is the
    # one thing that needs it, so it pays for it.
    allow_ssl()
    import ssl

    return ssl.create_default_context()


def _os_error(exc: OSError) -> str:
    """The OS's words for a failed connection: asyncio's strerror is "Connect call failed"."""
    if isinstance(exc, ConnectionError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc.strerror or exc)


async def tcp_probe(address: str, timeout: float) -> ProbeResult:
    """A TCP connection accepted within `timeout`."""
    host, _, port_s = address.rpartition(":")
    if not port_s.isdigit():
        return False, f"bad address {address!r} (expected host:port)"
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host or "127.0.0.1", int(port_s))
            writer.close()
    except TimeoutError:
        return False, f"tcp {address}: no connection within {timeout:g}s"
    except OSError as exc:
        return False, f"tcp {address}: {_os_error(exc)}"
    return True, f"tcp {address}: connected"


async def run_probe(
    check: str,
    spec: EngineSpec,
    timeout: float,
    ping: PingSender | None,
    env: dict[str, str],
) -> ProbeResult:
    """Run the probe named by an engine's `health.check`."""
    try:
        if check == "ping":
            return await ping_probe(ping, timeout)
        if check.startswith("command:"):
            return await command_probe(spec, check.removeprefix("command:"), env, timeout)
        if check.startswith(("http:", "https:")):
            return await http_probe(check, timeout)
        if check.startswith("tcp:"):
            return await tcp_probe(check.removeprefix("tcp:"), timeout)
    except Exception as exc:  # a probe must never take the daemon down
        return False, f"probe error: {type(exc).__name__}: {exc}"
    return False, f"unknown check {check!r}"


def probe_env(
    spec: EngineSpec, instance_id: str, pid: int | None, daemon_id: str
) -> dict[str, str]:
    """The environment of a command check: the instance's, plus which instance it checks."""
    index = int(split_instance_id(instance_id)[1] or 0)
    env = dict(os.environ)
    env.update(spec.env_for(index))
    env[process.DAEMON_ID_ENV] = daemon_id
    env[process.INSTANCE_INDEX_ENV] = str(index)
    env["ENGCTL_CHECK_INSTANCE"] = instance_id
    if pid is not None:
        env["ENGCTL_CHECK_PID"] = str(pid)
    return env
