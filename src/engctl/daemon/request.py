"""One `engctl exec` request on its way through the daemon: the record the router, the
dispatcher and a worker channel pass along (no task per request: callbacks move it).

Plain data: imports the selection package (its selector and candidate), the admission
package (its gates and queue entries) and the server's reply type only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from engctl.errors import EngctlError

if TYPE_CHECKING:
    from .admission import Entry, Gate
    from .selection import Candidate, Selector
    from .server import Reply
    from .stats import RequestStats


class Request:
    """One exec request on its way: where it was tried, its deadline, where to reply."""

    __slots__ = (
        "attempts",
        "blocked",
        "caller",
        "cand",
        "deadline",
        "entry",
        "explain",
        "future",
        "gates",
        "id",
        "input_json",
        "last_error",
        "priority",
        "queued_at",
        "retries_left",
        "selector",
        "sent_at",
        "settled",
        "started",
        "stats",
        "target",
        "timeout",
        "tried",
        "waiting_for",
    )

    def __init__(
        self,
        req_id: str,
        input_json: bytes,
        selector: Selector,
        timeout: float,
        retries: int,
        explain: bool,
        future: Reply,
        priority: int = 5,
        caller: str = "",
    ) -> None:
        self.id = req_id
        self.input_json = input_json
        self.selector = selector
        self.timeout = timeout
        self.retries_left = retries
        self.explain = explain
        self.future = future
        self.tried: list[str] = []
        self.attempts = 0
        self.started = time.perf_counter()
        self.sent_at = 0.0
        self.target: Candidate | None = None  # where the last attempt went
        self.last_error: EngctlError | None = None
        self.deadline = 0.0  # loop time
        self.cand: Candidate | None = None  # the attempt in flight, and its instance's stats
        self.stats: RequestStats | None = None
        # The attempt in flight already has its outcome (it timed out): its slot stays held
        # until the late answer, or the loss, frees it, and then nothing more is counted.
        self.settled = False
        self.waiting_for = ""  # what a waiting request waits for, for its timeout message
        # Admission (`admission`): who asks and how urgently; the gates the attempt in flight
        # passed (their slots are given back when it ends); while it waits, its place in the
        # queue, since when (loop time) and the gate that holds it (None: no free instance).
        self.priority = priority
        self.caller = caller
        self.gates: tuple[Gate, ...] = ()
        self.entry: Entry | None = None
        self.queued_at = 0.0
        self.blocked: Gate | None = None
