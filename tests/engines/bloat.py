"""Worker whose RSS grows by `argv[1]` MiB a second (default 10) while it echoes its input.

A background thread allocates and touches the memory, so requests are answered as usual.
"""

import os
import sys
import threading
import time

from engctl.worker import serve

RATE = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
hoard: list[bytearray] = []


def grow() -> None:
    while True:
        hoard.append(bytearray(int(RATE * 1024 * 1024 / 10)))  # zero-filled: counts in RSS
        time.sleep(0.1)


def handle(value: object) -> object:
    return {"echo": value, "pid": os.getpid()}


if __name__ == "__main__":
    threading.Thread(target=grow, daemon=True).start()
    serve(handle)
