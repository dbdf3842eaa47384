"""Per-instance log files: every line timestamped, rotated by size, with live followers.

Writes are buffered appends (page cache, bounded by the line cap) so they stay on the event loop;
nothing here fsyncs. Writes are best-effort: a failure (a full disk, a symlink in place of the
file) is counted in the write health and never stops the caller, which is usually handling a
state change. Reading a tail is done off the loop by the caller.

Must not import supervision, request or policy modules: it only writes and reads files.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from engctl import trust
from engctl.errors import UnsafePathError
from engctl.homefiles import read_tail

from .storage import WriteHealth

__all__ = ["MAX_LINE_BYTES", "InstanceLog", "read_tail", "timestamp"]

# A process that writes without newlines still gets its output logged, in pieces this long.
MAX_LINE_BYTES = 8192

Follower = Callable[[str], None]


def timestamp(now: float | None = None) -> str:
    """UTC ISO 8601 with milliseconds, the prefix of every log line."""
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


class InstanceLog:
    """The log file of one instance (`NAME.K.log`, rotated to `.1` … `.N`)."""

    # One per instance: slots, and no set of followers until someone follows (`logs -f`).
    __slots__ = (
        "_fd",
        "_followers",
        "_partial",
        "_size",
        "backups",
        "health",
        "max_bytes",
        "path",
    )

    def __init__(
        self, path: Path, max_bytes: int, backups: int, health: WriteHealth | None = None
    ) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.health = health if health is not None else WriteHealth()
        self._followers: set[Follower] | None = None
        # Unfinished lines by (writer, stream): during a rollout two processes of one slot
        # write to its log at once.
        self._partial: dict[tuple[int, str], bytes] = {}
        self._fd = -1  # open from the first line on; a raw fd (a file object is 240 B more)
        self._size = 0

    def follow(self, follower: Follower) -> None:
        """Hand `follower` every line written from now on, until `unfollow`."""
        if self._followers is None:
            self._followers = set()
        self._followers.add(follower)

    def unfollow(self, follower: Follower) -> None:
        if self._followers is not None:
            self._followers.discard(follower)

    def _open(self) -> int:
        if self._fd < 0:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = trust.open_file(str(self.path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            # Unbuffered: each feed() is one write of whole lines, readers see them at once,
            # and hundreds of idle instances hold no buffers.
            try:
                self._size = os.lseek(fd, 0, os.SEEK_END)
            except OSError:
                os.close(fd)
                raise
            self._fd = fd
        return self._fd

    def feed(self, stream: str, data: bytes, writer: int = 0) -> None:
        """Append raw output of `stream` (stdout/stderr) of `writer` (a pid); complete lines
        are written."""
        buf = self._partial.pop((writer, stream), b"") + data
        *lines, rest = buf.split(b"\n")
        if any(len(line) > MAX_LINE_BYTES for line in lines):
            # Cap every line the same way, however the output was chunked by the pipe.
            lines = [
                ln[i : i + MAX_LINE_BYTES]
                for ln in lines
                for i in range(0, len(ln) or 1, MAX_LINE_BYTES)
            ]
        while len(rest) > MAX_LINE_BYTES:
            lines.append(rest[:MAX_LINE_BYTES])
            rest = rest[MAX_LINE_BYTES:]
        if rest:
            self._partial[writer, stream] = rest
        if lines:
            self._write_lines(stream, lines)

    def close_stream(self, stream: str, writer: int = 0) -> None:
        """The stream reached EOF: write what is left of a last unterminated line."""
        rest = self._partial.pop((writer, stream), b"")
        if rest:
            self._write_lines(stream, [rest])

    def note(self, text: str) -> None:
        """A line from engctl itself (start, exit), so the log tells the whole story."""
        self._write_lines("engctl", [text.encode()])

    def _write_lines(self, stream: str, lines: list[bytes]) -> None:
        prefix = f"{timestamp()} {stream}: ".encode()
        out = b"".join(prefix + line.rstrip(b"\r") + b"\n" for line in lines)
        try:
            fd = self._open()
            view = memoryview(out)
            while view:  # a file takes all at once but on a full disk (then OSError)
                view = view[os.write(fd, view) :]
        except (OSError, UnsafePathError) as exc:
            # Lost for the file, not for the followers below; the next write tries again.
            self.close()
            self.health.failed("logs", _as_os_error(exc), self.path)
        else:
            self._size += len(out)
            self.health.succeeded("logs")
        if self._followers:
            text = out.decode(errors="replace")
            for line in text.splitlines():
                for follower in list(self._followers):
                    follower(line)
        if self._size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self.close()
        try:
            for i in range(self.backups, 0, -1):
                src = self.path.with_name(f"{self.path.name}.{i - 1}") if i > 1 else self.path
                with contextlib.suppress(FileNotFoundError):
                    os.replace(src, self.path.with_name(f"{self.path.name}.{i}"))
            if self.backups == 0:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        except OSError as exc:
            self.health.failed("logs", exc, self.path)
        self._size = 0

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)


def _as_os_error(exc: OSError | UnsafePathError) -> OSError:
    return exc if isinstance(exc, OSError) else OSError(0, exc.message)
