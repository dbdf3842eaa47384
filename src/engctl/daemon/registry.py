"""The registry of engines and what the user asked of them, persisted atomically.

Each change is written to a temp file, fsynced and renamed over `registry.json` (then the folder
is fsynced) before the daemon acknowledges it, so an acknowledged change survives `kill -9`.
A registry that cannot be read is never replaced by an empty one: the daemon refuses to start
until the file is fixed or set aside by hand (`--reset-registry`); entries that cannot be read
are skipped, reported and written back unchanged, so nothing is lost.

Must not import supervision, request or policy modules: it persists what they are told.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engctl import trust
from engctl.errors import DaemonUnreachableError, SpecError, StorageError
from engctl.models import EngineSpec, check_dependencies
from engctl.states import DesiredState, Eligibility

from .storage import WriteHealth, aside_name, describe

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
    # The wanted generation of its processes (bumped by spec changes that need new processes
    # and by `reload`); 1 in a registry written before it was recorded.
    generation: int = 1

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "spec": self.spec.to_dict(),
            "desired": self.desired.value,
            "stopped_instances": sorted(self.stopped_instances),
        }
        if self.registered_at is not None:
            out["registered_at"] = self.registered_at
        if self.generation != 1:
            out["generation"] = self.generation
        if self.overrides:
            out["overrides"] = {str(k): v for k, v in sorted(self.overrides.items())}
        return out


ENTRY_KEYS = ("spec", "desired", "stopped_instances", "overrides", "registered_at", "generation")
RESET_HINT = (
    "fix the file, or start with an empty registry: `engctl daemon start --reset-registry`"
    " (moves the file aside, deletes nothing)"
)


def parse_entry(name: str, item: Any) -> Entry:
    """One engine of `registry.json`; raise SpecError (or ValueError, …) when it is bad."""
    if not isinstance(item, dict):
        raise SpecError(f"expected an object, got {type(item).__name__}")
    unknown = sorted(set(item) - set(ENTRY_KEYS))
    if unknown:
        raise SpecError(f"unknown key {unknown[0]!r}")
    if "spec" not in item:
        raise SpecError("missing 'spec'")
    spec = EngineSpec.from_dict(name, item["spec"])
    stopped = item.get("stopped_instances", [])
    overrides = item.get("overrides", {})
    if not isinstance(stopped, list) or not isinstance(overrides, dict):
        raise SpecError("stopped_instances must be a list and overrides an object")
    for saved in overrides.values():
        Eligibility(saved["eligibility"])
    generation = item.get("generation", 1)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 1:
        raise SpecError(f"generation must be a positive integer, got {generation!r}")
    return Entry(
        spec,
        DesiredState(item.get("desired", "running")),
        {int(i) for i in stopped},
        {int(k): dict(v) for k, v in overrides.items()},
        _registered_at(item.get("registered_at")),
        generation,
    )


class Registry:
    """Reads and writes `registry.json`; the supervisor's engines are the live copy."""

    def __init__(
        self,
        path: Path,
        snapshot: Callable[[], list[Entry]],
        health: WriteHealth | None = None,
    ) -> None:
        self.path = path
        self._snapshot = snapshot
        self._lock = asyncio.Lock()
        self.health = health if health is not None else WriteHealth()
        # Entries that could not be read: name -> {"error", "raw"}; written back as they were.
        self.skipped: dict[str, dict[str, Any]] = {}
        # Changes made durable before they are applied to the live engines (see `staged`).
        self._staged: list[Mapping[str, Entry | None]] = []

    def load(self) -> list[Entry]:
        """Entries written by a previous daemon; a missing file is an empty registry.

        An unreadable file raises DaemonUnreachableError (the daemon does not start); bad
        entries are skipped into `skipped`, with engines that depend on them.
        """
        try:
            raw = trust.read_file(str(self.path))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise DaemonUnreachableError(
                f"cannot read the registry {self.path}: {describe(exc)}; {RESET_HINT}"
            ) from exc
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise self._unreadable(f"not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("engines"), dict):
            raise self._unreadable('expected an object with an "engines" object')
        if doc.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            raise self._unreadable(
                f"format version {doc.get('version')!r}, this engctl reads {FORMAT_VERSION}"
            )
        good: dict[str, Entry] = {}
        for name, item in doc["engines"].items():
            try:
                good[name] = parse_entry(name, item)
            except (ValueError, KeyError, TypeError, AttributeError, SpecError) as exc:
                self._skip(name, item, str(exc) or type(exc).__name__)
        self._skip_unresolved(good, doc["engines"])
        return [good[n] for n in good]

    def _unreadable(self, why: str) -> DaemonUnreachableError:
        return DaemonUnreachableError(f"registry {self.path} is unreadable ({why}); {RESET_HINT}")

    def _skip(self, name: str, raw: Any, error: str) -> None:
        self.skipped[name] = {"error": error, "raw": raw}

    def _skip_unresolved(self, good: dict[str, Entry], raw: dict[str, Any]) -> None:
        """Skip engines whose dependencies were skipped (or form a cycle): none is started
        without what it needs."""
        while True:
            for name in sorted(good):
                missing = [d for d in good[name].spec.depends_on if d not in good]
                if missing:
                    self._skip(name, raw[name], f"depends on {missing[0]!r}, which is skipped")
                    del good[name]
                    break
            else:
                try:
                    check_dependencies({n: e.spec for n, e in good.items()})
                    return
                except SpecError as exc:
                    cycle = exc.message.removeprefix("dependency cycle: ").split(" -> ")
                    for name in set(cycle) & set(good):
                        self._skip(name, raw[name], exc.message)
                        del good[name]

    def skipped_json(self) -> list[dict[str, str]]:
        """The entries that could not be read: `[{"name", "error"}]`."""
        return [{"name": n, "error": v["error"]} for n, v in sorted(self.skipped.items())]

    def reset(self) -> Path | None:
        """Move `registry.json` aside (never deleted); its new path, or None if there was none."""
        if not os.path.lexists(self.path):
            return None
        target = aside_name(self.path, "reset")
        os.rename(self.path, target)
        return target

    @contextlib.asynccontextmanager
    async def staged(self, changes: Mapping[str, Entry | None]) -> AsyncIterator[None]:
        """Make `changes` (name -> new entry, None to remove) durable, then let the caller
        apply them to the live engines; saves meanwhile include them.

        If they cannot be saved (StorageError), the caller applies nothing.
        """
        self._staged.append(changes)
        try:
            await self.save()
            yield
        finally:
            self._staged.remove(changes)

    async def save(self) -> None:
        """Persist the live engines; returns once the data is durable (else StorageError)."""
        # The snapshot is taken under the lock, so a write never lands an older state.
        async with self._lock:
            engines = {e.spec.name: e.to_json() for e in self._snapshot()}
            for layer in self._staged:
                for name, entry in layer.items():
                    if entry is None:
                        engines.pop(name, None)
                    else:
                        engines[name] = entry.to_json()
            kept = {n: v["raw"] for n, v in self.skipped.items() if n not in engines}
            doc = {
                "version": FORMAT_VERSION,
                "engines": dict(sorted({**kept, **engines}.items())),
            }
            data = json.dumps(doc, indent=1).encode()
            try:
                await asyncio.to_thread(atomic_write, self.path, data)
            except OSError as exc:
                self.health.failed("registry", exc, self.path)
                raise StorageError(
                    f"cannot save the registry {self.path}: {describe(exc)}"
                ) from exc
            self.health.succeeded("registry")
            # A skipped entry replaced by a live engine of that name is gone from the file.
            for name in set(self.skipped) & set(engines):
                del self.skipped[name]


def _registered_at(value: Any) -> float | None:
    """The saved registration time; None (unknown) when absent, as in older registries."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` so that `path` holds either the old or the new content, never a mix.

    The temp file is created afresh (O_EXCL, never through a symlink) and removed again if
    anything fails, e.g. a full disk.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # left by a killed daemon that had this pid
    try:
        fd = trust.open_file(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
