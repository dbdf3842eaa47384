"""`engctl.worker.serve`'s loop over a real pipe: answers, batching, and its read buffer."""

from __future__ import annotations

import io
import json
import os
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engctl import worker


class _Recording(io.BufferedReader):
    """A pipe's reader that records the buffer of every `readinto1` call."""

    def __init__(self, fd: int) -> None:
        super().__init__(io.FileIO(fd, "rb"))
        self.buffers: list[int] = []

    def readinto1(self, buffer: Any) -> int:
        self.buffers.append(id(buffer))
        return super().readinto1(buffer)


def _serve_over_a_pipe(frames: list[bytes]) -> tuple[list[dict[str, Any]], _Recording]:
    """Serve the echo handler on a pipe fed `frames` one write at a time; its answers."""
    rfd, wfd = os.pipe()
    reader = _Recording(rfd)
    out = io.BytesIO()

    def run() -> None:
        worker._serve_sync(lambda v: {"echo": v}, reader, out)

    thread = threading.Thread(target=run)
    thread.start()
    for frame in frames:
        os.write(wfd, frame)
    os.close(wfd)
    thread.join(10)
    assert not thread.is_alive()
    reader.close()
    return [json.loads(line) for line in out.getvalue().splitlines()], reader


def test_worker_reads_into_one_buffer_not_a_new_bytes_per_read() -> None:
    """Issue 13 (regression): every read of a worker went into a new 256 KiB bytes object, above
    glibc's mmap threshold: a map, faults and an unmap per request (15-20 µs of a wake-up).
    All reads now go into one buffer, and requests split across reads are answered whole."""
    frame = b'{"jsonrpc":"2.0","id":%d,"method":"execute","params":{"input":%s}}\n'
    big = json.dumps({"text": "é" * 100_000}).encode()
    whole = frame % (2, big)
    frames = [frame % (1, b"1"), whole[:70_000], whole[70_000:], frame % (3, b'"x"')]
    answers, reader = _serve_over_a_pipe(frames)
    assert [a["id"] for a in answers] == [1, 2, 3]
    assert answers[1]["result"] == {"echo": json.loads(big)}
    assert len(reader.buffers) >= 3 and len(set(reader.buffers)) == 1


def test_worker_answers_a_last_request_without_its_newline() -> None:
    """A request cut short by the end of input is still answered (what it always did)."""
    answers, _ = _serve_over_a_pipe([b'{"jsonrpc":"2.0","id":7,"method":"execute","params":{}}'])
    assert answers == [{"jsonrpc": "2.0", "id": 7, "result": {"echo": None}}]


def test_a_synchronous_worker_does_not_import_asyncio() -> None:
    """Issue 13 (regression): `engctl.worker` imported asyncio (and with it ssl and logging)
    for every worker: 40 of its 55 ms of import and 8 MiB of each echo worker's RSS. Only an
    async handler needs it now."""
    code = (
        "import sys\n"
        "from engctl.worker import serve\n"
        "serve(lambda v: v)\n"
        "assert 'asyncio' not in sys.modules, 'asyncio imported'\n"
        "assert 'ssl' not in sys.modules, 'ssl imported'\n"
    )
    assert _answer_of_a_worker_process(code) == b'{"jsonrpc":"2.0","id":1,"result":5}'


def _answer_of_a_worker_process(code: str) -> bytes:
    """The last line a fresh Python running `code` (a worker) prints for one request of 5."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", code],
        input=b'{"jsonrpc":"2.0","id":1,"method":"execute","params":{"input":5}}\n',
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.splitlines()[-1]


def test_coroutine_functions_are_told_as_inspect_tells_them() -> None:
    """`serve` picks the async loop for what `inspect.iscoroutinefunction` calls a coroutine
    function, without importing inspect: functions, methods, partials."""
    import functools
    import inspect

    async def a(x: object) -> object:
        return x

    def s(x: object) -> object:
        return x

    class C:
        async def m(self, x: object) -> object:
            return x

        def n(self, x: object) -> object:
            return x

        async def __call__(self, x: object) -> object:
            return x

    for h in (a, s, C().m, C().n, functools.partial(a), functools.partial(s), C(), print, len):
        assert worker._is_coroutine_function(h) == inspect.iscoroutinefunction(h), h



@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(1, 5000), min_size=0, max_size=12),
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=5),
)
def test_worker_answers_requests_however_the_reads_cut_them(
    cuts: list[int], sizes: list[int]
) -> None:
    """Issue 13 (regression): each read was joined to the unfinished request and split again,
    a sixth of a worker's time at 115 KB. Newlines are now searched for once per read: every
    request is answered whole and in order wherever the writes cut the stream."""
    frame = b'{"jsonrpc":"2.0","id":%d,"method":"execute","params":{"input":%s}}\n'
    stream = b"".join(frame % (i, json.dumps("é" * n).encode()) for i, n in enumerate(sizes))
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(stream[start : start + cut])
        start += cut
    pieces.append(stream[start:])
    answers, _ = _serve_over_a_pipe([p for p in pieces if p])
    assert [a["id"] for a in answers] == list(range(len(sizes)))
    assert [a["result"]["echo"] for a in answers] == ["é" * n for n in sizes]


def test_worker_keeps_what_it_loaded_out_of_the_collectors_walks() -> None:
    """Issue 13 (regression): a large request makes thousands of objects, and the full
    collections they set off walked the whole heap of the worker each time (a quarter of its
    time at 115 KB). `serve` freezes what the engine loaded before serving."""
    code = (
        "import gc\n"
        "from engctl.worker import serve\n"
        "serve(lambda v: gc.get_freeze_count())\n"
    )
    assert json.loads(_answer_of_a_worker_process(code))["result"] > 1000


def test_a_large_request_is_read_as_json_reads_it() -> None:
    """Issue 13: a request of LARGE_LINE bytes or more is read by msgspec (its integers exact,
    no scan for runs of digits); what msgspec refuses and `json` reads (NaN) reads alike."""
    pad = "x" * worker.LARGE_LINE
    for text in ('{"n": 123456789012345678901234567890, "p": "%s"}', '{"n": NaN, "p": "%s"}'):
        line = (text % pad).encode()
        got, want = worker._loads(line), json.loads(line)
        assert got.keys() == want.keys() and got["p"] == want["p"]
        assert repr(got["n"]) == repr(want["n"])
    with pytest.raises(ValueError):
        worker._loads(b'{"p": "%s"' % pad.encode())


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "é€😀", "\u2028"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=16,
)


@settings(max_examples=200, deadline=None)
@given(value=_values, ascii_only=st.booleans(), cut=st.integers(0, 40))
def test_a_large_request_reads_as_json_reads_it_on_generated_values(
    value: Any, ascii_only: bool, cut: int
) -> None:
    """Issue 13: a request of LARGE_LINE bytes or more (msgspec's path) reads as `json.loads`
    reads it, integers past 64 bits, NaN and lone surrogates included; a line cut short is
    refused with a ValueError, as by `json`."""
    try:
        text = json.dumps([value, "x" * worker.LARGE_LINE], ensure_ascii=ascii_only)
    except (TypeError, ValueError):
        return
    line = text.encode("utf-8", "surrogatepass")
    if cut:
        line = line[:-cut]

    def outcome(read: Any) -> tuple[str, Any]:
        try:
            return "ok", read(line)
        except (ValueError, RecursionError) as exc:
            return type(exc).__name__, None

    got, want = outcome(worker._loads), outcome(json.loads)
    assert got[0] == want[0]
    if got[0] == "ok":
        assert repr(got[1]) == repr(want[1])


def test_a_stdin_that_only_reads_lines_is_served_to_its_end() -> None:
    """`serve(stdin=...)` with an object that has `readline` only: each line answered, blank
    lines skipped, a last request without its newline answered, and the loop ends at EOF."""

    class Lines:
        def __init__(self, data: bytes) -> None:
            self.buf = io.BytesIO(data)

        def readline(self) -> bytes:
            return self.buf.readline()

    frame = b'{"jsonrpc":"2.0","id":%d,"method":"execute","params":{"input":%d}}'
    out = io.BytesIO()
    worker._serve_sync(lambda v: v, Lines(frame % (1, 1) + b"\n\n" + frame % (2, 2)), out)  # type: ignore[arg-type]
    assert [json.loads(x)["result"] for x in out.getvalue().splitlines()] == [1, 2]
