"""Reading a home's logs and event log: the daemon's readers, and the CLI's own when no
daemon runs (`engctl logs`, `engctl events`).

Files are opened under the trust rules of `engctl.trust` (never through a symlink).
Shared contract: stdlib only; never imports `engctl.daemon`.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engctl import trust
from engctl.errors import EngctlError

if TYPE_CHECKING:
    from engctl.documents import EventDoc


def read_tail(paths: list[Path], lines: int) -> list[str]:
    """The last `lines` lines over the given files (oldest first), reading from the end."""
    if lines <= 0:
        return []
    chunks: list[list[str]] = []
    have = 0
    # Newest file first; older (rotated) files are read only while lines are still missing.
    for path in reversed(paths):
        try:
            f = os.fdopen(trust.open_file(str(path), os.O_RDONLY), "rb")
        except FileNotFoundError:  # rotated away since it was listed
            continue
        with f:
            size = f.seek(0, 2)
            # Read ~ lines × 512 bytes from the end, enough for typical lines; grow the window
            # while it holds too few whole lines, or a gap would open before older files.
            window = (lines - have) * 512
            while True:
                start = max(0, size - window)
                f.seek(start)
                text = f.read(size - start).decode(errors="replace").splitlines()
                if start > 0 and text:
                    text = text[1:]  # first line is cut
                if start == 0 or len(text) >= lines - have:
                    break
                window *= 4
        text = text[-(lines - have) :]
        chunks.append(text)
        have += len(text)
        if have >= lines:
            break
    return [line for chunk in reversed(chunks) for line in chunk]


def tail_logs(sources: list[tuple[str, list[Path]]], lines: int) -> list[dict[str, str]]:
    """The last `lines` lines over several instances' files ((instance id, files oldest
    first) each), as `{"instance", "line"}` in time order."""
    out: list[dict[str, str]] = []
    for inst_id, files in sources:
        out += [{"instance": inst_id, "line": ln} for ln in read_tail(files, lines)]
    # Lines start with an ISO timestamp, so text order is time order across instances.
    out.sort(key=lambda d: d["line"][:24])
    return out[-lines:] if lines else []


def log_sources(log_dir: Path, engine: str, index: int | None) -> list[tuple[str, list[Path]]]:
    """The log files found for an engine (all its instances, or its oneshot runs) or one
    instance, without the daemon: `NAME.K.log` (`NAME.oneshot.log`) and its rotated
    `NAME.K.log.N`, oldest first."""
    pattern = re.compile(rf"^{re.escape(engine)}\.(\d+|oneshot)\.log(?:\.(\d+))?$")
    found: dict[str, list[tuple[int, Path]]] = {}
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        names = []
    for name in names:
        m = pattern.match(name)
        if m is None or (index is not None and m.group(1) != str(index)):
            continue
        # The current file is generation 0; a higher rotation number is older.
        found.setdefault(m.group(1), []).append((int(m.group(2) or 0), log_dir / name))
    order = sorted(found, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0))
    return [(f"{engine}#{k}", [p for _, p in sorted(found[k], reverse=True)]) for k in order]


def select_events(
    conn: sqlite3.Connection, engine: str | None, since: float | None, limit: int
) -> list[tuple[Any, ...]]:
    """The newest `limit` rows of the event log (oldest first), for one engine or after a time."""
    sql = "SELECT * FROM events WHERE 1=1"
    args: list[Any] = []
    if engine:
        sql += " AND engine = ?"
        args.append(engine)
    if since is not None:
        sql += " AND at >= ?"
        args.append(since)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    return list(reversed(conn.execute(sql, args).fetchall()))


def read_events(
    db: Path, engine: str | None = None, since: float | None = None, limit: int = 100
) -> list[EventDoc]:
    """`events --json` objects read from the file (read-only; none if there is no file)."""
    if not trust.check_path(str(db)):
        return []
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            rows = select_events(conn, engine, since, limit)
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise EngctlError(f"cannot read the event log {db}: {exc}") from exc
    return [
        {
            "id": r[0],
            "at": r[1],
            "kind": r[2],
            "engine": r[3],
            "instance": r[4],
            "from": r[5],
            "to": r[6],
            "reason": r[7],
            "data": json.loads(r[8]) if r[8] else {},
        }
        for r in rows
    ]
