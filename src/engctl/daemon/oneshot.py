"""One request to a `oneshot` engine: spawn the command, feed the payload, collect stdout.

Payload on stdin (or substituted for `{input}` in the argv), stdout is the result (JSON when it
parses, else text), exit code 0 is success; a failure carries the exit code and the tail of
stderr. The whole process group is killed at the deadline. Mechanism only: the caller decides
what a failure means.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Callable
from typing import Any

from engctl.models import EngineSpec

from . import process
from .process import ChildProcess, ExitStatus, SpawnError

PLACEHOLDER = "{input}"
# Output beyond this is a failure, not a reason to grow the daemon without bound.
MAX_STDOUT_BYTES = 16 * 1024 * 1024
STDERR_TAIL_BYTES = 2048

Done = Callable[[bool, Any, str], None]


def decode_output(data: bytes) -> Any:
    """A oneshot's stdout as JSON when it is, else as text without the final newline."""
    text = data.decode(errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text.removesuffix("\n")


class OneshotRun:
    """One spawned process for one request; calls `done(ok, result_or_none, error_message)`."""

    def __init__(
        self,
        spec: EngineSpec,
        payload: str,
        env: dict[str, str],
        loop: asyncio.AbstractEventLoop,
        timeout: float,
        done: Done,
    ) -> None:
        self._loop = loop
        self._done_cb: Done | None = done
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._open_pipes = 0
        self._status: ExitStatus | None = None
        argv = spec.argv
        use_argv = any(PLACEHOLDER in a for a in argv)
        if use_argv:
            argv = [a.replace(PLACEHOLDER, payload) for a in argv]
        try:
            self.proc: ChildProcess | None = process.spawn(
                argv,
                cwd=spec.cwd,
                env=env,
                pipe_stdin=not use_argv,
                stdout_to_pipe=True,
                loop=loop,
                on_exit=self._exited,
            )
        except SpawnError as exc:
            self.proc = None
            loop.call_soon(self._finish, False, None, str(exc))
            return
        popen = self.proc.popen
        for pipe, buf in ((popen.stdout, self._stdout), (popen.stderr, self._stderr)):
            assert pipe is not None
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            self._open_pipes += 1
            loop.add_reader(fd, self._read, pipe, buf)
        if popen.stdin is not None:
            self._pending_in = memoryview(payload.encode())
            fd = popen.stdin.fileno()
            os.set_blocking(fd, False)
            self._write_stdin()
        self._timer = loop.call_later(timeout, self._timeout, timeout)

    def _write_stdin(self) -> None:
        assert self.proc is not None
        stdin = self.proc.popen.stdin
        assert stdin is not None
        fd = stdin.fileno()
        try:
            n = os.write(fd, self._pending_in) if self._pending_in else 0
        except BlockingIOError:
            n = 0
        except OSError:  # the command exited without reading its input
            self._pending_in = memoryview(b"")
            n = 0
        self._pending_in = self._pending_in[n:]
        if self._pending_in:
            self._loop.add_writer(fd, self._write_more)
            return
        stdin.close()  # EOF: the command may now answer

    def _write_more(self) -> None:
        assert self.proc is not None and self.proc.popen.stdin is not None
        self._loop.remove_writer(self.proc.popen.stdin.fileno())
        self._write_stdin()

    def _read(self, pipe: Any, buf: bytearray) -> None:
        fd = pipe.fileno()
        data = process.read_available(fd)
        if data is None:
            return
        if data:
            buf += data
            if buf is self._stderr and len(buf) > STDERR_TAIL_BYTES * 2:
                del buf[:-STDERR_TAIL_BYTES]
            if len(self._stdout) > MAX_STDOUT_BYTES and self.proc is not None:
                process.signal_group(self.proc.pgid, signal.SIGKILL)
            return
        self._loop.remove_reader(fd)
        pipe.close()
        self._open_pipes -= 1
        self._maybe_finish()

    def _exited(self, proc: ChildProcess, status: ExitStatus) -> None:
        self._status = status
        # Anything the command left behind in its group goes with it.
        process.signal_group(proc.pgid, signal.SIGKILL)
        self._maybe_finish()

    def _timeout(self, timeout: float) -> None:
        if self.proc is not None:
            process.signal_group(self.proc.pgid, signal.SIGKILL)
        self._finish(False, None, f"timed out after {timeout:g}s; killed the process group")

    def _maybe_finish(self) -> None:
        if self._status is None or self._open_pipes > 0:
            return
        self._timer.cancel()
        status = self._status
        if len(self._stdout) > MAX_STDOUT_BYTES:
            self._finish(False, None, f"output exceeds {MAX_STDOUT_BYTES} bytes")
        elif status.code == 0:
            self._finish(True, decode_output(bytes(self._stdout)), "")
        else:
            tail = self._stderr[-STDERR_TAIL_BYTES:].decode(errors="replace").strip()
            self._finish(False, None, f"{status.describe()}" + (f": {tail}" if tail else ""))

    def _finish(self, ok: bool, result: Any, error: str) -> None:
        cb, self._done_cb = self._done_cb, None
        if cb is not None:
            with contextlib.suppress(Exception):
                self._timer.cancel()
            cb(ok, result, error)

    def kill(self) -> None:
        """Kill the process group now, without calling `done` (daemon shutdown)."""
        self._done_cb = None
        if self.proc is not None:
            self._timer.cancel()
            process.signal_group(self.proc.pgid, signal.SIGKILL)
