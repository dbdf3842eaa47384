"""A fault-injectable echo worker for benchmarks/faults.py (run as a script by the daemon).

Every `execute` sleeps the base service time (env FAULTY_BASE_MS, default 2 ms: the slow policy
ignores differences under its `min_latency_ms`, so 10× a sub-millisecond echo would be noise)
and answers `{"echo": input}`. A control request, input `{"fault": NAME}` routed to one
instance (`Client.exec(..., instance="engine#k")`), switches that process into a fault mode and
is answered at once; the mode lives in the process, so a restart clears it:

- `crash`: the next request kills the process (`os._exit(3)`) without an answer;
- `hang`: the next request blocks the main thread forever (pings go unanswered too);
- `slow`: requests take 10× the base time;
- `failing`: every 2nd request from now on raises (50 % errors);
- `leak`: a thread grows the RSS by FAULTY_LEAK_MIB_S MiB/s (default 10), touching every page.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from engctl.worker import serve

BASE_S = float(os.environ.get("FAULTY_BASE_MS", "2")) / 1000
SLOW_FACTOR = 10
LEAK_MIB_S = float(os.environ.get("FAULTY_LEAK_MIB_S", "10"))
FAULTS = ("crash", "hang", "slow", "failing", "leak")

mode: str | None = None
count = 0  # execute requests since the fault was switched on
hoard: list[bytes] = []


def grow() -> None:
    """Keep LEAK_MIB_S MiB per second alive, in 1 MiB chunks written byte by byte."""
    period = 1.0 / LEAK_MIB_S
    due = time.monotonic()
    while True:
        hoard.append(b"\x01" * (1 << 20))  # a repeat writes every page: real RSS, not COW zeros
        due += period
        time.sleep(max(0.0, due - time.monotonic()))


def handle(value: Any) -> Any:
    global mode, count
    if isinstance(value, dict) and "fault" in value:
        fault = value["fault"]
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (expected one of {', '.join(FAULTS)})")
        mode, count = fault, 0
        if fault == "leak":
            threading.Thread(target=grow, daemon=True).start()
        return {"fault": fault, "pid": os.getpid()}
    count += 1
    if mode == "crash":
        os._exit(3)
    if mode == "hang":
        threading.Event().wait()  # forever: this sync worker answers nothing, ping included
    if mode == "failing" and count % 2 == 0:
        raise RuntimeError(f"injected failure (request {count} since the fault)")
    time.sleep(BASE_S * (SLOW_FACTOR if mode == "slow" else 1))
    return {"echo": value}


if __name__ == "__main__":
    serve(handle)
