"""Unit tests of per-instance log files: line prefixes, partial lines, rotation, tails."""

from __future__ import annotations

import re
from pathlib import Path

from engctl.daemon.logs import MAX_LINE_BYTES, InstanceLog, read_tail, timestamp

PREFIX = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (stdout|stderr|engctl): ")


def lines_of(path: Path) -> list[str]:
    """The lines of a log file; none when it does not exist (just rotated away)."""
    return path.read_text().splitlines() if path.exists() else []


def bodies(path: Path) -> list[tuple[str, str]]:
    """(stream, text) of every line of a log file, checking each line's prefix."""
    out = []
    for line in lines_of(path):
        m = PREFIX.match(line)
        assert m, line
        out.append((m.group(1), line[m.end() :]))
    return out


def test_timestamp_is_utc_iso_with_milliseconds() -> None:
    """The line prefix is UTC ISO 8601 with milliseconds and a Z."""
    assert timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert timestamp(86400 + 3661.25) == "1970-01-02T01:01:01.250Z"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", timestamp())


def test_every_line_has_timestamp_and_stream(tmp_path: Path) -> None:
    """Each complete line is written with a timestamp and its stream name."""
    log = InstanceLog(tmp_path / "logs" / "web.0.log", max_bytes=1 << 20, backups=2)
    log.feed("stdout", b"hello\nworld\n")
    log.feed("stderr", b"oops\r\n")
    log.note("started pid 42")
    log.close()
    assert bodies(log.path) == [
        ("stdout", "hello"),
        ("stdout", "world"),
        ("stderr", "oops"),
        ("engctl", "started pid 42"),
    ]


def test_partial_lines_are_joined_across_feeds(tmp_path: Path) -> None:
    """A line split over several reads is written once, whole, when its newline arrives."""
    log = InstanceLog(tmp_path / "a.log", 1 << 20, 1)
    log.feed("stdout", b"hel")
    log.feed("stdout", b"lo wo")
    assert not log.path.exists() or log.path.read_bytes() == b""
    log.feed("stdout", b"rld\nnext")
    log.close()
    assert bodies(log.path) == [("stdout", "hello world")]


def test_streams_keep_separate_partial_lines(tmp_path: Path) -> None:
    """Partial stdout and stderr lines do not mix."""
    log = InstanceLog(tmp_path / "a.log", 1 << 20, 1)
    log.feed("stdout", b"out-")
    log.feed("stderr", b"err-")
    log.feed("stdout", b"1\n")
    log.feed("stderr", b"2\n")
    log.close()
    assert bodies(log.path) == [("stdout", "out-1"), ("stderr", "err-2")]


def test_long_output_without_newline_is_split(tmp_path: Path) -> None:
    """Output without newlines is written in pieces of MAX_LINE_BYTES; the rest waits."""
    log = InstanceLog(tmp_path / "a.log", 1 << 20, 1)
    log.feed("stdout", b"x" * (2 * MAX_LINE_BYTES + 10))
    assert [len(text) for _, text in bodies(log.path)] == [MAX_LINE_BYTES, MAX_LINE_BYTES]
    log.close_stream("stdout")
    log.close()
    assert [len(text) for _, text in bodies(log.path)] == [MAX_LINE_BYTES, MAX_LINE_BYTES, 10]


def test_long_output_in_small_chunks_is_split_the_same(tmp_path: Path) -> None:
    """Many small reads without a newline also give pieces of MAX_LINE_BYTES."""
    log = InstanceLog(tmp_path / "a.log", 1 << 20, 1)
    for _ in range(MAX_LINE_BYTES // 1000 * 3):
        log.feed("stdout", b"y" * 1000)
    log.close_stream("stdout")
    log.close()
    sizes = [len(text) for _, text in bodies(log.path)]
    assert all(s == MAX_LINE_BYTES for s in sizes[:-1])
    assert sum(sizes) == MAX_LINE_BYTES // 1000 * 3 * 1000


def test_close_stream_flushes_a_trailing_partial_line(tmp_path: Path) -> None:
    """At EOF the last unterminated line is written; closing again writes nothing more."""
    log = InstanceLog(tmp_path / "a.log", 1 << 20, 1)
    log.feed("stderr", b"done\nno newline")
    log.close_stream("stderr")
    log.close_stream("stderr")
    log.close_stream("stdout")
    log.close()
    assert bodies(log.path) == [("stderr", "done"), ("stderr", "no newline")]


def test_followers_get_each_prefixed_line(tmp_path: Path) -> None:
    """Every follower gets every written line, prefixed, without its newline."""
    log = InstanceLog(tmp_path / "a.log", 1 << 20, 1)
    got_a: list[str] = []
    got_b: list[str] = []
    log.follow(got_a.append)
    log.follow(got_b.append)
    log.feed("stdout", b"one\ntw")
    log.feed("stdout", b"o\n")
    log.unfollow(got_b.append)
    log.note("three")
    log.close()
    assert [PREFIX.sub("", line) for line in got_a] == ["one", "two", "three"]
    assert [PREFIX.sub("", line) for line in got_b] == ["one", "two"]
    assert got_a == lines_of(log.path)


def test_rotation_keeps_at_most_backups_files(tmp_path: Path) -> None:
    """Past max_bytes the file is rotated to .1 … .N and older files are dropped."""
    path = tmp_path / "web.0.log"
    log = InstanceLog(path, max_bytes=300, backups=2)
    for i in range(100):
        log.feed("stdout", f"line {i:03d}\n".encode())
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["web.0.log", "web.0.log.1", "web.0.log.2"]
    for p in (path.with_name("web.0.log.1"), path.with_name("web.0.log.2")):
        assert 300 <= p.stat().st_size < 300 + 64
    # The files hold consecutive, newest-last runs of the lines, with nothing lost between them.
    texts = [
        t for f in ("web.0.log.2", "web.0.log.1", "web.0.log") for _, t in bodies(tmp_path / f)
    ]
    numbers = [int(t.split()[1]) for t in texts]
    assert numbers == list(range(numbers[0], 100))


def test_rotation_with_no_backups_truncates(tmp_path: Path) -> None:
    """With backups = 0 a full log starts over and no numbered files appear."""
    path = tmp_path / "a.log"
    log = InstanceLog(path, max_bytes=200, backups=0)
    for i in range(50):
        log.feed("stdout", f"line {i}\n".encode())
    log.close()
    assert [p.name for p in tmp_path.iterdir()] in (["a.log"], [])
    assert sum(len(line) + 1 for line in lines_of(path)) < 200 + 64


def test_log_reopens_and_appends_after_close(tmp_path: Path) -> None:
    """A closed log appends to the existing file and counts its size toward rotation."""
    path = tmp_path / "a.log"
    first = InstanceLog(path, max_bytes=1 << 20, backups=1)
    first.feed("stdout", b"a\n")
    first.close()
    second = InstanceLog(path, max_bytes=1 << 20, backups=1)
    second.feed("stdout", b"b\n")
    second.close()
    assert bodies(path) == [("stdout", "a"), ("stdout", "b")]


def test_read_tail_spans_rotated_files_in_order(tmp_path: Path) -> None:
    """The tail is the last N lines over the rotated files, oldest first."""
    path = tmp_path / "web.0.log"
    log = InstanceLog(path, max_bytes=400, backups=3)
    for i in range(60):
        log.feed("stdout", f"line {i:03d}\n".encode())
    log.close()
    files = [path.with_name(f"web.0.log.{i}") for i in (3, 2, 1)] + [path]
    all_lines = [line for f in files for line in lines_of(f)]
    for n in (1, 5, len(lines_of(path)) + 3, 30):
        tail = read_tail(files, n)
        assert tail == all_lines[-n:]
    assert [PREFIX.sub("", t) for t in read_tail(files, 3)] == ["line 057", "line 058", "line 059"]


def test_read_tail_skips_missing_files_and_asks_for_nothing(tmp_path: Path) -> None:
    """Missing files are skipped; asking for 0 lines gives none."""
    path = tmp_path / "a.log"
    path.write_text("one\ntwo\n")
    assert read_tail([tmp_path / "a.log.1", path], 5) == ["one", "two"]
    assert read_tail([path], 0) == []
    assert read_tail([tmp_path / "missing"], 5) == []


def test_read_tail_of_long_lines_has_no_gaps(tmp_path: Path) -> None:
    """Lines much longer than usual still give exactly the last N, contiguous, lines."""
    old, new = tmp_path / "a.log.1", tmp_path / "a.log"
    old.write_text("".join(f"old {i} {'o' * 2000}\n" for i in range(10)))
    new.write_text("".join(f"new {i} {'n' * 2000}\n" for i in range(10)))
    tail = read_tail([old, new], 6)
    assert [t.split()[0:2] for t in tail] == [["new", str(i)] for i in range(4, 10)]
    tail = read_tail([old, new], 12)
    assert [t.split()[0:2] for t in tail] == [["old", "8"], ["old", "9"]] + [
        ["new", str(i)] for i in range(10)
    ]


def test_offline_log_sources_include_oneshot_runs(tmp_path: Path) -> None:
    """Without a daemon, `logs NAME` finds the instances' files and the oneshot runs' file
    (NAME.oneshot.log), rotated ones oldest first; `NAME#K` only that instance's."""
    from engctl.homefiles import log_sources

    for name in ("w.0.log", "w.0.log.1", "w.1.log", "w.oneshot.log", "w.oneshot.log.2", "x.0.log"):
        (tmp_path / name).write_text("")
    found = log_sources(tmp_path, "w", None)
    assert [(i, [p.name for p in files]) for i, files in found] == [
        ("w#0", ["w.0.log.1", "w.0.log"]),
        ("w#1", ["w.1.log"]),
        ("w#oneshot", ["w.oneshot.log.2", "w.oneshot.log"]),
    ]
    assert [i for i, _ in log_sources(tmp_path, "w", 1)] == ["w#1"]
