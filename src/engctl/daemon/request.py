"""One `engctl exec` request on its way through the daemon: the record the router, the
dispatcher and a worker channel pass along (no task per request: callbacks move it).

Plain data: imports the selection package (its selector and candidate) and the server's reply
type only.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from engctl.errors import EngctlError

if TYPE_CHECKING:
    from .selection import Candidate, Selector
    from .server import Reply
    from .stats import RequestStats


class Request:
    """One exec request on its way: where it was tried, its deadline, where to reply."""

    __slots__ = (
        "attempts",
        "cand",
        "deadline",
        "explain",
        "future",
        "id",
        "input_json",
        "last_error",
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
