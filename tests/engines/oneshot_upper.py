"""Oneshot: print stdin upper-cased, then exit: `oneshot_upper.py [CODE] [SLEEP] [PIDFILE]`.

A non-zero CODE also writes a line to stderr first; SLEEP seconds pass before the output;
PIDFILE receives this process's pid at start (to check a killed run leaves nothing behind).
"""

import os
import sys
import time

code = int(sys.argv[1]) if len(sys.argv) > 1 else 0
delay = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
if len(sys.argv) > 3:
    with open(sys.argv[3], "w") as f:
        f.write(str(os.getpid()))
data = sys.stdin.read()
time.sleep(delay)
if code:
    print(f"oneshot failing on purpose with {code}", file=sys.stderr, flush=True)
sys.stdout.write(data.upper())
sys.exit(code)
