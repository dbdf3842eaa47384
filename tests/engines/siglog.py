"""A service that logs the name of the first signal it gets (TERM, INT, HUP, USR1) and exits 0."""

import signal
import sys
import time


def bye(signum: int, frame: object) -> None:
    print(f"got {signal.Signals(signum).name}", file=sys.stderr, flush=True)
    sys.exit(0)


for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
    signal.signal(sig, bye)
print("waiting for a signal", file=sys.stderr, flush=True)
while True:
    time.sleep(3600)
