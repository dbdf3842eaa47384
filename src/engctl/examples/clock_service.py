"""A service that logs the time every second: shows `engctl logs -f` with timestamps."""

import sys
import time

if __name__ == "__main__":
    n = 0
    while True:
        n += 1
        print(f"tick {n}", flush=True)
        if n % 5 == 0:
            print(f"still alive after {n} ticks", file=sys.stderr, flush=True)
        time.sleep(1)
