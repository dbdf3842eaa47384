"""The registry of engines and what the user asked of them, persisted atomically.

Each change is written to a temp file, fsynced and renamed over `registry.json` (then the folder
is fsynced) before the daemon acknowledges it, so an acknowledged change survives `kill -9`.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engctl.errors import SpecError
from engctl.models import EngineSpec
from engctl.states import DesiredState

FORMAT_VERSION = 1


@dataclass
class Entry:
    """One engine: its spec, whether it should run, and instances stopped by hand."""

    spec: EngineSpec
    desired: DesiredState = DesiredState.RUNNING
    stopped_instances: set[int] = field(default_factory=set)
    # Manual isolate/drain per instance index: {"eligibility", "reason", "since"}.
    overrides: dict[int, dict[str, Any]] = field(default_factory=dict)
    # When it was first registered (epoch seconds); kept across updates and daemon restarts.
    registered_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec.to_dict(),
            "desired": self.desired.value,
            "stopped_instances": sorted(self.stopped_instances),
        }
        if self.registered_at is not None:
            out["registered_at"] = self.registered_at
        if self.overrides:
            out["overrides"] = {str(k): v for k, v in sorted(self.overrides.items())}
        return out


class Registry:
    """Reads and writes `registry.json`; the supervisor's engines are the live copy."""

    def __init__(self, path: Path, snapshot: Callable[[], list[Entry]]) -> None:
        self.path = path
        self._snapshot = snapshot
        self._lock = asyncio.Lock()

    def load(self) -> list[Entry]:
        """Entries written by a previous daemon; a missing file is an empty registry."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
            return [
                Entry(
                    EngineSpec.from_dict(name, item["spec"]),
                    DesiredState(item.get("desired", "running")),
                    {int(i) for i in item.get("stopped_instances", [])},
                    {int(k): dict(v) for k, v in item.get("overrides", {}).items()},
                    _registered_at(item.get("registered_at")),
                )
                for name, item in doc["engines"].items()
            ]
        except (ValueError, KeyError, TypeError, AttributeError, SpecError) as exc:
            # Keep the unreadable file for a human; never overwrite it silently.
            bad = self.path.with_suffix(".json.corrupt")
            os.replace(self.path, bad)
            raise SpecError(f"registry {self.path} is unreadable ({exc}); moved to {bad}") from exc

    async def save(self) -> None:
        """Persist the live engines; returns once the data is durable."""
        # The snapshot is taken under the lock, so a write never lands an older state.
        async with self._lock:
            entries = sorted(self._snapshot(), key=lambda e: e.spec.name)
            doc = {
                "version": FORMAT_VERSION,
                "engines": {e.spec.name: e.to_json() for e in entries},
            }
            data = json.dumps(doc, indent=1).encode()
            await asyncio.to_thread(atomic_write, self.path, data)


def _registered_at(value: Any) -> float | None:
    """The saved registration time; None (unknown) when absent, as in older registries."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either the old or the new content, never a mix."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
