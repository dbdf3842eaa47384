"""Worker whose behaviour is switched per instance by flag files: `moody.py DIR [SECONDS]`.

Each request sleeps SECONDS (default 0.01), ten times that while `DIR/NAME#K.slow` exists,
and fails while `DIR/NAME#K.fail` exists. Answers carry the echo and the instance id.
"""

import os
import sys
import time

from engctl.worker import serve

DIR = sys.argv[1]
DELAY = float(sys.argv[2]) if len(sys.argv) > 2 else 0.01
INSTANCE = os.environ.get("ENGCTL_INSTANCE", "")


def flag(name: str) -> bool:
    return os.path.exists(os.path.join(DIR, f"{INSTANCE}.{name}"))


def handle(value: object) -> object:
    time.sleep(DELAY * 10 if flag("slow") else DELAY)
    if flag("fail"):
        raise RuntimeError(f"{INSTANCE} failing on purpose")
    return {"echo": value, "instance": INSTANCE}


if __name__ == "__main__":
    serve(handle)
