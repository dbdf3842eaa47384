"""Exits with a code after a delay: `crashing.py [SECONDS] [CODE]` (defaults 0.0 and 1)."""

import sys
import time

delay = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
code = int(sys.argv[2]) if len(sys.argv) > 2 else 1
print(f"crashing in {delay}s with code {code}", file=sys.stderr, flush=True)
time.sleep(delay)
sys.exit(code)
