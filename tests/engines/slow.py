"""Worker that answers each request after a delay: `slow.py [SECONDS]` (default 0.2).

The handler is async, so with max_concurrency > 1 requests overlap in one process. An input
object with a "delay" key overrides the delay for that request. Each answer carries the
echo, the pid and instance, and `in_flight`: how many requests this process was running when
this one started (itself included), so a test can see any overlap beyond the limit.
"""

import asyncio
import os
import sys

from engctl.worker import serve

DELAY = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
running = 0


async def handle(value: object) -> dict[str, object]:
    global running
    running += 1
    in_flight = running
    try:
        delay = value.get("delay", DELAY) if isinstance(value, dict) else DELAY
        await asyncio.sleep(float(delay))
    finally:
        running -= 1
    return {
        "echo": value,
        "pid": os.getpid(),
        "instance": os.environ.get("ENGCTL_INSTANCE"),
        "in_flight": in_flight,
    }


if __name__ == "__main__":
    serve(handle)
