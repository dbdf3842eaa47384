"""Worker that exits with code 3 on its first execute: `dies.py [SUFFIX]`.

With SUFFIX, only the instances whose ENGCTL_INSTANCE ends with it die; the others echo their
input with their instance id.
"""

import os
import sys

from engctl.worker import serve

SUFFIX = sys.argv[1] if len(sys.argv) > 1 else ""
INSTANCE = os.environ.get("ENGCTL_INSTANCE", "")


def handle(value: object) -> object:
    if INSTANCE.endswith(SUFFIX):
        print(f"{INSTANCE} dying on purpose", file=sys.stderr, flush=True)
        os._exit(3)
    return {"echo": value, "instance": INSTANCE}


if __name__ == "__main__":
    serve(handle)
