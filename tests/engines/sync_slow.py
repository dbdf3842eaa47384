"""Worker with a synchronous handler that sleeps `input["sleep"]` seconds, then answers its pid.

While it sleeps it reads nothing, so it cannot answer ping either: a busy worker, not a
hung one (the hang policy must judge it by hang_timeout, not by a caller's deadline).
"""

import os
import time

from engctl.worker import serve


def handle(value: object) -> object:
    delay = value.get("sleep", 0) if isinstance(value, dict) else 0
    time.sleep(float(delay))
    return {"pid": os.getpid()}


if __name__ == "__main__":
    serve(handle)
