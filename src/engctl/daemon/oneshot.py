"""One request to a `oneshot` engine: spawn the command, feed the payload, collect stdout.

Payload on stdin (or substituted for `{input}` in the argv), stdout is the result (JSON when it
parses, else text), exit code 0 is success; a failure carries the exit code and the tail of
stderr, and stderr goes to the engine's log. The caller kills the whole process group at the
deadline (`kill`). Mechanism only: the caller decides what a failure means.

Imports `process`, `output` and `logs` only, never a policy or request module.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from engctl.models import EngineSpec

from . import output, process
from .logs import MAX_LINE_BYTES
from .process import ChildProcess, ExitStatus, SpawnError

PLACEHOLDER = "{input}"
STDERR_TAIL_BYTES = 2048

Done = Callable[[bool, Any, str], None]


class LogSink(Protocol):
    """Where a run's stderr lines and notes go: an engine's log (`InstanceLog`), or the
    daemon's own log for a hook's command."""

    def feed(self, stream: str, data: bytes) -> None: ...

    def note(self, text: str) -> None: ...


def decode_output(data: bytes) -> Any:
    """A oneshot's stdout as JSON when it parses (`output.decode`), else as text without the
    final newline: text is a valid result here, so no parse failure is an error."""
    try:
        return output.decode(data)
    except output.OutputError:
        return data.decode(errors="replace").removesuffix("\n")


def uses_argv(spec: EngineSpec) -> bool:
    """Whether the payload replaces `{input}` in the argv (else it goes to stdin)."""
    return any(PLACEHOLDER in a for a in spec.argv)


class OneshotRun:
    """One spawned process for one request; calls `done(ok, result_or_none, error_message)`.

    `payload` must not hold a NUL byte when the argv takes it (the caller checks: an argv
    cannot carry one). stdout past `max_stdout` bytes fails the run; stderr goes to `log`.
    With `timeout`, the run kills itself and fails then; without, the caller `kill`s it.
    """

    def __init__(
        self,
        spec: EngineSpec,
        payload: str,
        env: dict[str, str],
        loop: asyncio.AbstractEventLoop,
        done: Done,
        *,
        max_stdout: int,
        timeout: float | None = None,
        log: LogSink | None = None,
        label: str = "",
    ) -> None:
        self._loop = loop
        self._done_cb: Done | None = done
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._max_stdout = max_stdout
        self._log = log
        self._log_partial = b""
        self._open_pipes = 0
        self._status: ExitStatus | None = None
        self._started = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None
        argv = spec.argv
        use_argv = uses_argv(spec)
        if use_argv:
            argv = [a.replace(PLACEHOLDER, payload) for a in argv]
        self.proc: ChildProcess | None = None
        self._payload = payload if not use_argv else None
        self._label = label
        if timeout is not None:
            self._timer = loop.call_later(timeout, self._timeout, timeout)
        # Off the loop: the fork and exec wait until the command has exec'd.
        process.spawn_soon(
            argv,
            cwd=spec.cwd,
            env=env,
            pipe_stdin=not use_argv,
            stdout_to_pipe=True,
            loop=loop,
            on_exit=self._exited,
            then=self._launched,
        )

    def _launched(self, result: ChildProcess | SpawnError) -> None:
        if isinstance(result, SpawnError):
            self._note(f"{self._label}: {result}")
            self._finish(False, None, str(result))
            return
        self.proc = result
        self._note(f"{self._label}: started pid {result.pid}")
        for fd, buf in ((result.stdout, self._stdout), (result.stderr, self._stderr)):
            assert fd is not None
            os.set_blocking(fd, False)
            self._open_pipes += 1
            self._loop.add_reader(fd, self._read, fd, buf)
        if result.stdin is not None:
            self._pending_in = memoryview((self._payload or "").encode())
            self._payload = None
            os.set_blocking(result.stdin, False)
            self._write_stdin()
        if self._done_cb is None:
            # Killed, or timed out, before its process existed: it goes now.
            process.signal_group(result.pgid, signal.SIGKILL)

    def _write_stdin(self) -> None:
        assert self.proc is not None
        fd = self.proc.stdin
        assert fd is not None
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
        self.proc.close_pipe(fd)  # EOF: the command may now answer

    def _write_more(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self._loop.remove_writer(self.proc.stdin)
        self._write_stdin()

    def _read(self, fd: int, buf: bytearray) -> None:
        data = process.read_available(fd)
        if data is None:
            return
        if data:
            buf += data
            if buf is self._stderr:
                self._log_stderr(data)
                if len(buf) > STDERR_TAIL_BYTES * 2:
                    del buf[:-STDERR_TAIL_BYTES]
            elif len(buf) > self._max_stdout and self.proc is not None:
                process.signal_group(self.proc.pgid, signal.SIGKILL)
            return
        self._loop.remove_reader(fd)
        if buf is self._stderr and self._log_partial:
            self._log_stderr(b"\n")  # the last line, unterminated
        if self.proc is not None:
            self.proc.close_pipe(fd)
        self._open_pipes -= 1
        self._maybe_finish()

    def _log_stderr(self, data: bytes) -> None:
        """Whole lines of stderr to the engine's log: runs at once share the file, so a
        run's unfinished line waits here rather than in the log's per-stream buffer."""
        if self._log is None:
            return
        data = self._log_partial + data
        cut = data.rfind(b"\n") + 1
        whole, rest = data[:cut], data[cut:]
        if len(rest) > MAX_LINE_BYTES:  # a line without an end: logged in pieces
            whole, rest = data + b"\n", b""
        self._log_partial = rest
        if whole:
            self._log.feed("stderr", whole)

    def _note(self, text: str) -> None:
        if self._log is not None:
            self._log.note(text)

    def _exited(self, proc: ChildProcess, status: ExitStatus) -> None:
        self._status = status
        # Anything the command left behind in its group goes with it.
        process.signal_group(proc.pgid, signal.SIGKILL)
        self._note(
            f"pid {proc.pid} {status.describe()} after {time.monotonic() - self._started:.2f}s"
        )
        self._maybe_finish()

    def _timeout(self, timeout: float) -> None:
        self._timer = None
        if self.proc is not None:
            process.signal_group(self.proc.pgid, signal.SIGKILL)
        self._finish(False, None, f"timed out after {timeout:g}s; killed the process group")

    def _maybe_finish(self) -> None:
        if self._status is None or self._open_pipes > 0:
            return
        status = self._status
        if len(self._stdout) > self._max_stdout:
            self._finish(False, None, f"output exceeds the limit of {self._max_stdout} bytes")
        elif status.code == 0:
            self._finish(True, decode_output(bytes(self._stdout)), "")
        else:
            tail = self._stderr[-STDERR_TAIL_BYTES:].decode(errors="replace").strip()
            self._finish(False, None, f"{status.describe()}" + (f": {tail}" if tail else ""))

    def _finish(self, ok: bool, result: Any, error: str) -> None:
        cb, self._done_cb = self._done_cb, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if cb is not None:
            cb(ok, result, error)

    def kill(self) -> None:
        """Kill the process group now, without calling `done` (deadline, daemon shutdown)."""
        self._done_cb = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.proc is not None and self.proc.alive:
            process.signal_group(self.proc.pgid, signal.SIGKILL)
