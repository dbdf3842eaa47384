"""Worker that says ready and answers ping, but writes a non-JSON line for every execute."""

import json
import sys

out = sys.stdout.buffer
out.write(b'{"jsonrpc":"2.0","method":"ready"}\n')
out.flush()
for line in sys.stdin.buffer:
    msg = json.loads(line)
    if msg.get("method") == "ping":
        out.write(b'{"jsonrpc":"2.0","id":%d,"result":"pong"}\n' % msg["id"])
    else:
        out.write(b"GARBAGE-LINE this is not json\n")
    out.flush()
