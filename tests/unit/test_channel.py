"""The worker channel's batching: answers of many worker pipes read in one loop turn leave
together (issue 13.3), with real pipes and a real event loop; the rest of the daemon faked."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, BinaryIO, cast

import pytest

from engctl.daemon import pipes, process
from engctl.daemon.channel import WorkerChannel
from engctl.daemon.pipes import DEFAULT_PIPE_BYTES, PipeBudget
from engctl.daemon.server import Outbox
from engctl.errors import EngctlError


class Sink:
    """A client connection's output: what the outbox flushes, counted per flush."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.out: list[bytes] = []
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self.out:
            self.outbox.mark(self)
        self.out.append(data)

    def _flush(self) -> None:
        self.writes.append(b"".join(self.out))
        self.out.clear()


class Owner:
    """The dispatcher as a channel sees it: answers go to the sink."""

    def __init__(self, loop: asyncio.AbstractEventLoop, budget: PipeBudget | None = None) -> None:
        self.loop = loop
        self.outbox = Outbox(loop)
        self.sink = Sink(self.outbox)
        self.pipe_budget = budget or PipeBudget.of_this_user()

    def answered(self, req: Any, ok: bool, result: Any, error: EngctlError | None) -> None:
        self.sink.write(b"%s\n" % result.raw)

    def instance_ready(self, inst: Any, reason: str) -> None: ...
    def protocol_error(self, inst: Any, text: str) -> None: ...
    def blame(self, inst: Any, why: str) -> None: ...
    def channel_broken(self, channel: Any, why: str) -> None: ...


class Proc(process.Launched):
    """A launched process as a channel uses it: the daemon's end of the worker's stdin (a
    real pipe, read back through `reader`), and of its stdout (another, written through
    `writer`) when asked for."""

    def __init__(self, stdout: bool = False) -> None:
        r, w = os.pipe()
        super().__init__(cast("Any", SimpleNamespace(pid=0)), w, None, None)
        self.reader = os.fdopen(r, "rb")
        self.writer: BinaryIO | None = None
        if stdout:
            r, w = os.pipe()
            self.stdout = r
            self.writer = os.fdopen(w, "wb")


class Req:
    """A request as a channel uses it: its input, already JSON."""

    def __init__(self, input_json: bytes = b"1") -> None:
        self.input_json = input_json


class Inst:
    def __init__(self, k: int) -> None:
        self.id = f"echo#{k}"


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_answers_of_many_pipes_in_one_loop_turn_leave_in_one_client_write(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Issue 13.3: with one request per instance, each worker pipe holds one answer; answers
    read in the same loop turn from every pipe go to the client in one write, not one each."""
    owner = Owner(loop)
    procs = [Proc() for _ in range(4)]
    channels = [WorkerChannel(owner, Inst(k), p) for k, p in enumerate(procs)]  # type: ignore[arg-type]
    try:
        for ch in channels:
            ch.send(Req())  # type: ignore[arg-type]
        owner.outbox.flush()  # the requests reach the workers' stdin
        # Each pipe's answer arrives in a callback of its own, all ready in the same turn.
        for ch in channels:
            loop.call_soon(ch.feed, b'{"jsonrpc":"2.0","id":1,"result":{"n":%d}}\n' % id(ch))
        loop.run_until_complete(asyncio.sleep(0.01))
        assert len(owner.sink.writes) == 1
        assert owner.sink.writes[0].count(b"\n") == 4
    finally:
        for ch in channels:
            ch.close()
        for p in procs:
            p.reader.close()


def test_frames_larger_than_the_pipe_arrive_whole_and_in_order(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Issue 13.2: frames that wait for a full pipe (kept as a queue of frames, written with
    writev as the worker reads) reach it byte for byte, in the order they were sent."""
    owner = Owner(loop)
    proc = Proc()
    channel = WorkerChannel(owner, Inst(0), proc)  # type: ignore[arg-type]
    inputs = [b'"%s"' % (bytes([97 + k]) * (200_000 + k)) for k in range(6)]
    expected = b"".join(
        b'{"jsonrpc":"2.0","id":%d,"method":"execute","params":{"input":%s}}\n' % (k + 1, x)
        for k, x in enumerate(inputs)
    )
    got = bytearray()

    async def run() -> None:
        reader = proc.reader.fileno()
        os.set_blocking(reader, False)
        done = loop.create_future()

        def readable() -> None:
            got.extend(os.read(reader, 50_000))  # a slow worker: less than a frame per read
            if len(got) >= len(expected):
                loop.remove_reader(reader)
                done.set_result(None)

        loop.add_reader(reader, readable)
        for x in inputs:
            channel.send(Req(x))  # type: ignore[arg-type]
        await asyncio.wait_for(done, 10)

    try:
        loop.run_until_complete(run())
        assert bytes(got) == expected
    finally:
        channel.close()
        proc.reader.close()


def _pipe_bytes(fd: int) -> int:
    size = pipes.pipe_size(fd)
    assert size is not None
    return size


def test_a_frame_larger_than_the_pipe_grows_it_to_cross_whole(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Issue 13 (regression): a 115 KB request crossed the worker's 64 KiB stdin in pieces, a
    wake-up of each side per piece. The first frame that does not fit grows the pipe to hold it
    (within the budget), an answer line that came in pieces grows stdout alike, and closing
    the channel gives the budget back."""
    budget = PipeBudget(total=4 * 1024 * 1024, largest=1024 * 1024)
    owner = Owner(loop, budget)
    proc = Proc(stdout=True)
    channel = WorkerChannel(owner, Inst(0), proc)  # type: ignore[arg-type]
    assert proc.stdout is not None and proc.writer is not None
    stdout = proc.stdout
    try:
        assert _pipe_bytes(proc.reader.fileno()) == DEFAULT_PIPE_BYTES
        channel.send(Req(b'"%s"' % (b"x" * 1000)))  # type: ignore[arg-type]
        assert _pipe_bytes(proc.reader.fileno()) == DEFAULT_PIPE_BYTES
        channel.send(Req(b'"%s"' % (b"x" * 120_000)))  # type: ignore[arg-type]
        assert _pipe_bytes(proc.reader.fileno()) == 128 * 1024
        line = b'{"jsonrpc":"2.0","id":2,"result":"%s"}\n' % (b"y" * 200_000)
        channel.feed(line[:65536])
        channel.feed(line[65536:])  # a line that came in pieces
        assert _pipe_bytes(stdout) == 256 * 1024
        assert budget.used == (128 - 64) * 1024 + (256 - 64) * 1024
    finally:
        channel.close()
        proc.reader.close()
        proc.writer.close()
        proc.close_pipes()
    assert budget.used == 0


def test_pipes_grow_no_further_than_the_budget(loop: asyncio.AbstractEventLoop) -> None:
    """What the daemon adds to its pipes stays within its budget (a quarter of the user's pipe
    allowance: past it Linux gives every new pipe of the user 8 KiB)."""
    budget = PipeBudget(total=100 * 1024, largest=1024 * 1024)
    owner = Owner(loop, budget)
    procs = [Proc() for _ in range(3)]
    channels = [WorkerChannel(owner, Inst(k), p) for k, p in enumerate(procs)]  # type: ignore[arg-type]
    try:
        for ch in channels:
            ch.send(Req(b'"%s"' % (b"x" * 100_000)))  # type: ignore[arg-type]
        sizes = [_pipe_bytes(p.reader.fileno()) for p in procs]
        assert sizes == [128 * 1024, DEFAULT_PIPE_BYTES, DEFAULT_PIPE_BYTES]
        assert budget.used == 64 * 1024
    finally:
        for ch in channels:
            ch.close()
        for p in procs:
            p.reader.close()
