"""Service that sleeps, and on each SIGUSR1 grows its RSS by 40 MiB and writes the count of
signals it took to the file `argv[1]` (so a test knows the memory is in use)."""

import os
import signal
import sys
import time

hoard: list[bytearray] = []


def grow(signum: int, frame: object) -> None:
    hoard.append(bytearray(40 * 1024 * 1024))  # zero-filled: in RSS
    tmp = sys.argv[1] + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(len(hoard)))
    os.replace(tmp, sys.argv[1])


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, grow)
    while True:
        time.sleep(3600)
