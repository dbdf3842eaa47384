"""A worker with a latency knee, for benchmarks/admission.py: `knee_worker.py CORES SECONDS`.

It serves `CORES` requests at once, each in `SECONDS` ± 50 % (uniform: real services vary, and
their slots do not free in step); more in flight queue inside it, so its latency is flat up to
CORES in flight and grows linearly beyond (the curve an adaptive limit must find). Speaks the
worker protocol through engctl.worker.
"""

import asyncio
import random
import sys

from engctl.worker import serve

CORES = int(sys.argv[1]) if len(sys.argv) > 1 else 4
SECONDS = float(sys.argv[2]) if len(sys.argv) > 2 else 0.02
_cores: asyncio.Semaphore | None = None


async def handle(value: object) -> object:
    global _cores
    if _cores is None:
        _cores = asyncio.Semaphore(CORES)
    async with _cores:
        await asyncio.sleep(SECONDS * random.uniform(0.5, 1.5))
    return value


if __name__ == "__main__":
    serve(handle)
