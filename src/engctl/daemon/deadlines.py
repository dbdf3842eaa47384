"""Request deadlines without a loop timer per request: one ordered lane per timeout value and
one timer on the earliest head.

Imports only the request record (for its id, timeout and deadline).
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable

from .request import Request


class Deadlines:
    """Request deadlines without a loop timer per request.

    Requests with the same timeout expire in arrival order, so each timeout value keeps an
    ordered lane and one loop timer watches the earliest head; a finished request leaves its
    lane in O(1). Memory is bounded by the requests in flight.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_expired: Callable[[Request], None]
    ) -> None:
        self._loop = loop
        self._on_expired = on_expired
        self._lanes: dict[float, collections.OrderedDict[str, Request]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def add(self, req: Request) -> None:
        req.deadline = self._loop.time() + req.timeout
        lane = self._lanes.get(req.timeout)
        if lane is None:
            lane = self._lanes[req.timeout] = collections.OrderedDict()
        lane[req.id] = req
        if req.deadline < self._timer_at:
            self._arm(req.deadline)

    def __len__(self) -> int:
        """Requests with a deadline: every request the router holds (queued or in flight)."""
        return sum(len(lane) for lane in self._lanes.values())

    def discard(self, req: Request) -> None:
        lane = self._lanes.get(req.timeout)
        if lane is not None:
            lane.pop(req.id, None)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = self._loop.time()
        earliest = math.inf
        for timeout, lane in list(self._lanes.items()):
            while lane:
                req = next(iter(lane.values()))
                if req.deadline > now:
                    earliest = min(earliest, req.deadline)
                    break
                lane.popitem(last=False)
                self._on_expired(req)
            if not lane:
                del self._lanes[timeout]
        if earliest < math.inf:
            self._arm(earliest)
