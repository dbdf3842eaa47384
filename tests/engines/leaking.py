"""Grows its memory by `argv[1]` MiB a second (default 10) until killed."""

import sys
import time

rate = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
hoard = []
while True:
    hoard.append(bytearray(int(rate * 1024 * 1024 / 10)))  # touched: counts in RSS
    time.sleep(0.1)
