"""Writes a numbered line to stdout and stderr every `argv[1]` seconds (default 0.1)."""

import sys
import time

period = float(sys.argv[1]) if len(sys.argv) > 1 else 0.1
n = 0
while True:
    n += 1
    print(f"out {n}", flush=True)
    print(f"err {n}", file=sys.stderr, flush=True)
    time.sleep(period)
