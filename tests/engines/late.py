"""Worker that takes START seconds before it says ready, then answers each request after DELAY
seconds: `late.py START [DELAY]` (default DELAY 0.02). Answers carry the pid, the instance and
the generation it runs (ENGCTL_GENERATION), so a test can see which process served."""

import asyncio
import os
import sys
import time

from engctl.worker import serve

START = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
DELAY = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02


async def handle(value: object) -> dict[str, object]:
    await asyncio.sleep(DELAY)
    return {
        "echo": value,
        "pid": os.getpid(),
        "instance": os.environ.get("ENGCTL_INSTANCE"),
        "index": os.environ.get("ENGCTL_INSTANCE_INDEX"),
        "generation": os.environ.get("ENGCTL_GENERATION"),
    }


if __name__ == "__main__":
    time.sleep(START)
    serve(handle)
