"""Ignores SIGTERM: only SIGKILL after the stop timeout ends it."""

import signal
import sys
import time

signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ignoring SIGTERM", file=sys.stderr, flush=True)
while True:
    time.sleep(3600)
