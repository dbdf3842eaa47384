"""Worker that echoes its input but ignores pings while a flag file exists: `deaf.py DIR`.

Instance NAME#K does not answer `ping` while `DIR/NAME#K.deaf` exists (it still answers
`execute`), so its health probes fail and it answers them again once the file is removed.
A hand-written protocol loop: `engctl.worker.serve` always answers pings.
"""

import json
import os
import sys

FLAG = os.path.join(sys.argv[1], os.environ.get("ENGCTL_INSTANCE", "") + ".deaf")
INSTANCE = os.environ.get("ENGCTL_INSTANCE", "")
out = sys.stdout.buffer


def send(msg: dict[str, object]) -> None:
    out.write(json.dumps(msg).encode() + b"\n")
    out.flush()


send({"jsonrpc": "2.0", "method": "ready"})
deaf = False
for line in sys.stdin.buffer:
    msg = json.loads(line)
    if msg.get("method") == "ping":
        if os.path.exists(FLAG):
            if not deaf:
                print("deaf: ignoring pings", file=sys.stderr, flush=True)
            deaf = True
            continue
        deaf = False
        send({"jsonrpc": "2.0", "id": msg["id"], "result": "pong"})
    elif msg.get("method") == "execute":
        value = msg.get("params", {}).get("input")
        send({"jsonrpc": "2.0", "id": msg["id"], "result": {"echo": value, "instance": INSTANCE}})
