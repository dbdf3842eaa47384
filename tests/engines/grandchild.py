"""Forks a grandchild that sleeps forever and writes its pid to the file in argv[1].

With `--setsid` the grandchild leaves the process group too (it must still be found and killed).
"""

import os
import subprocess
import sys
import time

pidfile = sys.argv[1]
setsid = "--setsid" in sys.argv
child = subprocess.Popen(
    [sys.executable, "-c", "import time\nwhile True: time.sleep(3600)"],
    start_new_session=setsid,
)
with open(pidfile + ".tmp", "w") as f:
    f.write(str(child.pid))
os.replace(pidfile + ".tmp", pidfile)
print(f"grandchild {child.pid}", file=sys.stderr, flush=True)
while True:
    time.sleep(3600)
