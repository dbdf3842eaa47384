"""A service that sleeps forever and exits cleanly on SIGTERM."""

import signal
import sys
import time


def bye(signum: int, frame: object) -> None:
    print("got SIGTERM, exiting", file=sys.stderr, flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, bye)
print("sleeping", flush=True)
while True:
    time.sleep(3600)
