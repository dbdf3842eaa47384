"""Background tasks a daemon part starts and forgets: kept referenced until done (asyncio holds
only weak references), a failure logged with what it was, never lost silently.

Imports the stdlib only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

log = logging.getLogger("engctl.daemon")


class TaskSet:
    """The running background tasks of one owner (the enforcer, a rollout, the autoscaler)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        what: str,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self.loop = loop
        self.what = what  # "policy task", …: names a failure in the daemon log
        self.on_done = on_done
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `coro` in the background."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", self.what, exc_info=task.exception())
        if self.on_done is not None:
            self.on_done()

    def cancel(self) -> None:
        """Cancel every task still running (the owner closes)."""
        for task in self._tasks:
            task.cancel()

    async def join(self) -> None:
        """Wait until every task, including those started meanwhile, has ended."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[None]]:
        return iter(list(self._tasks))
