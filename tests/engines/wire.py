"""Worker that writes to its stdout whatever a test asks for: the worker protocol's misuses.

`wire.py [--silent] [--print TEXT] [--close-stdout]`: --silent never says `ready` nor answers
anything (reads stdin forever: a worker that never warms up); --print writes TEXT as a line
at start; --close-stdout closes stdout at start and lives on.

Otherwise it says `ready`, answers ping, and for `execute` with input:
- {"raw": TEXT}: writes TEXT (with %ID% replaced by the request id) and a newline;
- {"garbage": N}: writes N bytes of "x" and a newline, then a normal answer;
- {"big": N}: answers with a result string of N bytes;
- {"nested": N}: answers with a result of N nested lists;
- {"close_stdout": true}: closes stdout and lives on;
- {"sleep": S}: sleeps S seconds (reading nothing, answering nothing), then echoes;
- {"exit": CODE}: exits with CODE at once (a crash with the request in flight);
- anything else: answers {"echo": input}.
"""

import json
import os
import sys
import time

out = sys.stdout.buffer


def answer(wid: object, result: object) -> None:
    out.write(b'{"jsonrpc":"2.0","id":%s,"result":%s}\n' % (json.dumps(wid).encode(), result))
    out.flush()


def close_stdout_and_wait() -> None:
    out.flush()
    os.close(1)
    while True:
        time.sleep(60)


def main() -> None:
    args = sys.argv[1:]
    if "--close-stdout" in args:
        close_stdout_and_wait()
    if "--print" in args:
        out.write(args[args.index("--print") + 1].encode() + b"\n")
        out.flush()
    if "--silent" in args:
        for _ in sys.stdin.buffer:
            pass
        return
    out.write(b'{"jsonrpc":"2.0","method":"ready"}\n')
    out.flush()
    for line in sys.stdin.buffer:
        msg = json.loads(line)
        wid = msg.get("id")
        if msg.get("method") == "ping":
            answer(wid, b'"pong"')
            continue
        value = msg.get("params", {}).get("input")
        ask = value if isinstance(value, dict) else {}
        if "raw" in ask:
            out.write(ask["raw"].replace("%ID%", str(wid)).encode() + b"\n")
            out.flush()
        elif "garbage" in ask:
            out.write(b"x" * int(ask["garbage"]) + b"\n")
            answer(wid, b'"after garbage"')
        elif "big" in ask:
            answer(wid, b'"' + b"y" * int(ask["big"]) + b'"')
        elif "nested" in ask:
            n = int(ask["nested"])
            answer(wid, b"[" * n + b"]" * n)
        elif ask.get("close_stdout"):
            close_stdout_and_wait()
        elif "exit" in ask:
            os._exit(int(ask["exit"]))
        elif "sleep" in ask:
            time.sleep(float(ask["sleep"]))
            answer(wid, json.dumps({"echo": value}).encode())
        else:
            answer(wid, json.dumps({"echo": value}).encode())


if __name__ == "__main__":
    main()
