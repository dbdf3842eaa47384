"""The worker protocol over one instance's stdin and stdout: request ids, writes batched per
loop turn, lines split in linear time, replies matched to requests, garbage judged.

It speaks for the dispatcher that owns it (`dispatch`): answers, protocol errors and a broken
pipe go back through `ChannelOwner`. Frame templates are `protocol`'s, the reply parse is
`output`'s. Imports neither the router nor the supervisor.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from engctl import protocol
from engctl.errors import EngctlError, RequestFailedError
from engctl.protocol import WORKER_EXECUTE, WORKER_PING

from . import output, pipes
from .output import MAX_WORKER_LINE
from .pipes import DEFAULT_PIPE_BYTES, PipeBudget
from .request import Request
from .server import Outbox, RawJSON

if TYPE_CHECKING:
    from .instance import Instance
    from .process import ChildProcess

# Protocol garbage is logged with at most this many bytes of the offending line.
PREVIEW_BYTES = 200
# Frames handed to one writev(2) (IOV_MAX is 1024 on Linux).
WRITEV_FRAMES = 128


class ChannelOwner(Protocol):
    """What a channel reports to, and writes and reads through (the dispatcher)."""

    loop: asyncio.AbstractEventLoop
    outbox: Outbox
    pipe_budget: PipeBudget

    def answered(self, req: Request, ok: bool, result: Any, error: EngctlError | None) -> None:
        """The worker answered `req` (or the attempt failed with `error`)."""

    def instance_ready(self, inst: Instance, reason: str) -> None:
        """The worker announced it is ready (a `ready` notification)."""

    def protocol_error(self, inst: Instance, text: str) -> None:
        """A line on its stdout broke the protocol."""

    def blame(self, inst: Instance, why: str) -> None:
        """An error of the instance outside any request."""

    def channel_broken(self, channel: WorkerChannel, why: str) -> None:
        """The pipe is gone (stdin refused a write, or stdout closed)."""


class WorkerChannel:
    """The worker protocol over one instance's stdin/stdout: ids, batching, garbage."""

    def __init__(self, owner: ChannelOwner, inst: Instance, proc: ChildProcess) -> None:
        self.owner = owner
        self.inst = inst
        self.proc = proc
        assert proc.stdin is not None
        self._fd = proc.stdin
        os.set_blocking(self._fd, False)
        # Frames not written yet, oldest first. A deque of the frames themselves, not one
        # bytearray: with large inputs and a full pipe, a bytearray consumed at the front and
        # grown at the back copies all it holds again and again (megabytes per request).
        self._out: collections.deque[bytes | memoryview] = collections.deque()
        self._marked = False
        self._writer_on = False
        self._buf = bytearray()  # the line being received
        self._discarding = False  # inside a line over the limit: dropped up to its newline
        self.pending: dict[int, Request] = {}
        self._pings: dict[int, Callable[[], None]] = {}
        self._next_id = 1
        self.closed = False
        self.last_read = 0.0  # loop time of the last bytes from the worker
        # The pipes' capacities, grown for the first frame that does not fit (`pipes`).
        self._stdin_size = pipes.pipe_size(self._fd) or DEFAULT_PIPE_BYTES
        self._stdout_fd = proc.stdout if proc.stdout is not None else -1
        self._stdout_size = pipes.pipe_size(self._stdout_fd) or DEFAULT_PIPE_BYTES
        self._grown = 0  # bytes this channel's pipes took from the budget

    # -- writing -----------------------------------------------------------------------
    def send(self, req: Request) -> int:
        wid = self._next_id
        self._next_id += 1
        self.pending[wid] = req
        frame = WORKER_EXECUTE % (wid, req.input_json)
        if len(frame) > self._stdin_size:
            self._stdin_size = self._grow(self._fd, self._stdin_size, len(frame))
        self._write(frame)
        return wid

    def _grow(self, fd: int, size: int, frame: int) -> int:
        """Grow pipe `fd` (of `size` bytes) to take a frame of `frame` bytes whole, as far as the
        budget lets it: its size then."""
        budget = self.owner.pipe_budget
        wanted = budget.size_for(size, frame)
        if wanted is None or self.closed:
            return size
        held = pipes.resize_pipe(fd, wanted)
        if held is None:
            budget.refused()
            return size
        budget.took(size, held)
        self._grown += max(held - size, 0)
        return held

    def ping(self, on_answer: Callable[[], None]) -> None:
        """Send a ping; `on_answer()` runs when it is answered (never, if it is not)."""
        wid = self._next_id
        self._next_id += 1
        if len(self._pings) > 64:
            self._pings.clear()  # unanswered pings of a stuck worker must not pile up
        self._pings[wid] = on_answer
        self._write(WORKER_PING % wid)

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        self._out.append(data)
        if not self._marked and not self._writer_on:
            self._marked = True
            self.owner.outbox.mark(self)  # requests of one batch share one write

    def _flush(self) -> None:
        self._marked = False
        out = self._out
        if self.closed or not out:
            return
        try:
            if len(out) == 1:
                n = os.write(self._fd, out[0])
            else:
                n = os.writev(self._fd, list(itertools.islice(out, WRITEV_FRAMES)))
        except BlockingIOError:
            n = 0
        except OSError as exc:  # the worker closed its stdin or died
            self.owner.channel_broken(self, f"closed its stdin ({exc.strerror})")
            return
        while n:  # drop what was written: whole frames, then the written part of one
            size = len(out[0])
            if n < size:
                out[0] = memoryview(out[0])[n:]
                break
            out.popleft()
            n -= size
        if out and not self._writer_on:
            self._writer_on = True
            self.owner.loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        self.owner.loop.remove_writer(self._fd)
        self._writer_on = False
        self._flush()

    # -- reading -----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes from the worker's stdout (b"" at EOF)."""
        if not data:
            # The worker closed its stdout (or exited: a process's pipes close as it ends).
            self.owner.channel_broken(self, "closed its stdout")
            return
        self.last_read = self.owner.loop.time()
        # The answers read here leave with those every other worker pipe ready in this loop
        # turn gave (the outbox is flushed once they are all read): with many instances each
        # pipe holds one answer, and flushing per pipe made one client write per request.
        self._receive(data)

    def _receive(self, data: bytes) -> None:
        """Split `data` into lines in time linear in its size: the unfinished line waits in a
        bytearray and only new bytes are scanned for its end (re-joining the buffer per chunk
        made one long line cost quadratic time)."""
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return  # still inside a line over the limit
            self._discarding = False
            data = data[nl + 1 :]
        start = 0
        buf = self._buf
        if buf:
            nl = data.find(b"\n")
            if nl < 0:
                buf += data
                if len(buf) > MAX_WORKER_LINE:
                    self._oversized()
                return
            if len(buf) + nl > MAX_WORKER_LINE:
                self._oversized(discard=False)
            else:
                buf += data[:nl]
                line = bytes(buf)
                buf.clear()
                if len(line) >= self._stdout_size:  # it came in pieces: the next one need not
                    size = self._grow(self._stdout_fd, self._stdout_size, len(line) + 1)
                    self._stdout_size = size
                if line.strip():
                    self._line(line)
            start = nl + 1
        find = data.find
        while True:
            nl = find(b"\n", start)
            if nl < 0:
                break
            if nl > start:
                line = data[start:nl]
                if line.strip():
                    self._line(line)
            start = nl + 1
        if start < len(data):
            buf += data[start:]
            if len(buf) > MAX_WORKER_LINE:
                self._oversized()

    def _oversized(self, discard: bool = True) -> None:
        """A line over MAX_WORKER_LINE: a protocol error now, and its rest is dropped as it
        arrives (with `discard`) instead of being held."""
        head = bytes(self._buf[:PREVIEW_BYTES])
        self._buf.clear()
        self._discarding = discard
        self._garbage(head, f"a line longer than the limit of {MAX_WORKER_LINE} bytes")

    def _line(self, line: bytes) -> None:
        try:
            msg, raw = output.reply(line)
        except output.OutputError as exc:
            self._garbage(line, str(exc))
            return
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            self._garbage(line, "not a JSON-RPC 2.0 object")
            return
        if "id" not in msg:
            if msg.get("method") == "ready":
                self.owner.instance_ready(self.inst, "announced ready")
            return  # other notifications are allowed and ignored
        wid = msg["id"]
        if type(wid) is not int:  # we only send integer ids (true is not 1 here)
            self._garbage(line, f"unknown id {wid!r}")
            return
        if self._pings and wid in self._pings:
            self._pings.pop(wid)()
            return
        req = self.pending.pop(wid, None)
        if req is None:
            if wid < self._next_id:
                return  # the answer to a ping nobody waits for any more
            self._garbage(line, f"unknown id {wid!r}")
            return
        if raw is not None:
            # Its result exactly as the worker wrote it (the decoded value is the same), to be
            # spliced into the reply: no second encoding pass.
            self.owner.answered(req, True, RawJSON(raw), None)
        elif isinstance(msg.get("error"), dict):
            err = msg["error"]
            text = str(err.get("message", "error"))
            failed = RequestFailedError(f"{self.inst.id}: {text}", {"worker_error": err})
            self.owner.answered(req, False, None, failed)
        else:
            self.pending[wid] = req  # failed with the others by _garbage
            self._garbage(line, "response without result or error")

    def _garbage(self, line: bytes, why: str) -> None:
        """A protocol violation: an error of this instance, logged with the offending bytes.

        Its requests in flight fail at once (and may be retried elsewhere): after garbage, no
        answer on this pipe can be trusted to be theirs, and waiting would end in a timeout.
        """
        excerpt = protocol.preview(line[:PREVIEW_BYTES], PREVIEW_BYTES)
        self.inst.log.note(f"protocol error ({why}): {excerpt}")
        # Counted here as a protocol error; its requests get their outcome (error) below.
        self.inst.stats.protocol_errors += 1
        self.owner.protocol_error(self.inst, f"protocol error on stdout ({why}): {excerpt}")
        pending = list(self.pending.values())
        self.pending.clear()
        error = f"{self.inst.id} broke the worker protocol ({why}): {excerpt}"
        for req in pending:
            self.owner.answered(req, False, None, RequestFailedError(error))
        if not pending:
            self.owner.blame(self.inst, f"protocol error ({why})")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.owner.pipe_budget.gave_back(self._grown)
        if self._writer_on:
            self.owner.loop.remove_writer(self._fd)
        self.proc.close_pipe(self._fd)
