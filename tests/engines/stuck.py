"""Worker whose handler blocks forever on the input "hang"; other inputs are echoed.

The handler is synchronous, so while it blocks the worker answers nothing, not even ping:
the hang policy's case (compare hanging.py, which still answers ping). `stuck.py PIDFILE`
also starts a child that sleeps forever in the same process group and writes its pid there.
"""

import os
import subprocess
import sys
import threading

from engctl.worker import serve


def handle(value: object) -> object:
    if value == "hang":
        threading.Event().wait()  # never set
    return {"echo": value, "pid": os.getpid()}


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(60)"])
        with open(sys.argv[1] + ".tmp", "w") as f:
            f.write(str(child.pid))
        os.replace(sys.argv[1] + ".tmp", sys.argv[1])
    serve(handle)
