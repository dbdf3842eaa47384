"""The socket server alone (real socket, real event loop, no daemon): the wire-error boundary,
per-turn fairness, and the throttled log of refusals."""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import pytest

from engctl.daemon import server as server_mod
from engctl.daemon.server import Connection, Outbox, Server, ThrottledLog
from engctl.errors import INTERNAL_ERROR, INVALID_PARAMS, InvalidParamsError


def _bug(params: dict[str, Any], conn: Connection) -> Any:
    return dict[str, Any]()["missing"]  # a KeyError: a bug of the handler, not a bad parameter


def _checks(params: dict[str, Any], conn: Connection) -> Any:
    raise InvalidParamsError("parameter 'x' must be a string")


async def _serve(handlers: dict[str, Any], calls: list[bytes]) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="es", dir="/tmp"))
    loop = asyncio.get_running_loop()
    srv = Server(folder / "s.sock", handlers, 1 << 20, folder / "daemon.log", Outbox(loop))
    await srv.start()
    try:
        reader, writer = await asyncio.open_unix_connection(str(folder / "s.sock"))
        writer.write(b"".join(calls))
        answers = [json.loads(await reader.readline()) for _ in calls]
        writer.close()
        return answers
    finally:
        await srv.close()


def _call(req_id: int, method: str) -> bytes:
    return b'{"jsonrpc":"2.0","id":%d,"method":"%s","params":{}}\n' % (req_id, method.encode())


def test_handler_bug_is_an_internal_error_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A KeyError (or TypeError, ValueError) raised by a handler is an internal error logged
    with its traceback, not "invalid params" at DEBUG (issue 10.27); only InvalidParamsError
    gives -32602."""
    with caplog.at_level(logging.DEBUG, logger="engctl.server"):
        bug, checked = asyncio.run(
            _serve({"t.bug": _bug, "t.checks": _checks}, [_call(1, "t.bug"), _call(2, "t.checks")])
        )
    assert bug["error"]["code"] == INTERNAL_ERROR
    assert "KeyError" in bug["error"]["message"]
    assert checked["error"] == {"code": INVALID_PARAMS, "message": "parameter 'x' must be a string"}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert errors[0].exc_info[0] is KeyError


def test_pipelined_frames_are_handled_a_bounded_number_per_loop_turn() -> None:
    """Frames pipelined in one write are handled at most FRAMES_PER_TURN per loop turn (the
    rest on later turns, after other callbacks), in order, and every one is answered."""
    turns: list[int] = []
    seen: list[int] = []

    def note(params: dict[str, Any], conn: Connection) -> Any:
        seen.append(turn[0])
        return len(seen)

    turn = [0]

    async def run() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()

        def tick() -> None:  # counts loop turns while the frames are handled
            turn[0] += 1
            turns.append(turn[0])
            if turn[0] < 10_000:
                loop.call_soon(tick)

        loop.call_soon(tick)
        return await _serve({"t.note": note}, [_call(i, "t.note") for i in range(1000)])

    answers = asyncio.run(run())
    assert [a["result"] for a in answers] == list(range(1, 1001))
    per_turn: dict[int, int] = {}
    for t in seen:
        per_turn[t] = per_turn.get(t, 0) + 1
    assert max(per_turn.values()) <= server_mod.FRAMES_PER_TURN
    assert len(per_turn) >= 1000 // server_mod.FRAMES_PER_TURN


def test_throttled_log_writes_one_line_per_period_with_the_count_of_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood of refusals makes one log line per period; the next line says how many were
    left out."""
    now = [0.0]
    throttled = ThrottledLog(every=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="engctl.server"):
        for _ in range(1000):
            throttled.warning("refused a connection")
            now[0] += 0.001
        now[0] = 11.0
        throttled.warning("refused a connection")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused a connection",
        "refused a connection (and 999 more like it in the last 10s)",
    ]
