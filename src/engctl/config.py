"""Where engctl keeps its files, and the daemon's settings (`config.toml`).

Shared contract between CLI and daemon: stdlib only (platformdirs is imported when needed).
`ENGCTL_HOME` puts the socket, state and logs under one folder; otherwise platformdirs decides.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from engctl.errors import SpecError

# The dispatch strategies (SPEC §5), as named on the wire and in config.toml.
STRATEGIES = (
    "round_robin",
    "weighted_round_robin",
    "least_loaded",
    "weighted_random",
    "capability",
    "affinity",
    "consistent_hash",
)

# AF_UNIX socket paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


@dataclass(frozen=True)
class Paths:
    """The folders of one engctl home."""

    runtime_dir: Path
    state_dir: Path
    log_dir: Path
    config_file: Path

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "engctl.sock"

    @property
    def start_lock(self) -> Path:
        """Held by a CLI while it starts a daemon, so racing CLIs start one."""
        return self.runtime_dir / "start.lock"

    @property
    def daemon_lock(self) -> Path:
        """Held by the running daemon for its lifetime; contains its pid."""
        return self.state_dir / "daemon.pid"

    @property
    def registry(self) -> Path:
        return self.state_dir / "registry.json"

    @property
    def events_db(self) -> Path:
        return self.state_dir / "events.sqlite3"

    @property
    def daemon_log(self) -> Path:
        return self.state_dir / "daemon.log"

    @property
    def daemon_id(self) -> str:
        """Marks this home's engine processes (in their environment) for re-discovery.

        The state folder itself: unique per home, and readable in `ps e` output.
        """
        return str(self.state_dir)

    def instance_log(self, engine: str, index: int) -> Path:
        return self.log_dir / f"{engine}.{index}.log"


def resolve_paths(home: str | os.PathLike[str] | None = None) -> Paths:
    """Paths from an explicit home, else `ENGCTL_HOME`, else platformdirs' user folders."""
    home = home or os.environ.get("ENGCTL_HOME")
    if home:
        root = Path(home).expanduser().absolute()
        return Paths(root / "run", root / "state", root / "logs", root / "config.toml")
    import platformdirs

    return Paths(
        runtime_dir=Path(platformdirs.user_runtime_dir("engctl")),
        state_dir=Path(platformdirs.user_state_dir("engctl")),
        log_dir=Path(platformdirs.user_log_dir("engctl")),
        config_file=Path(platformdirs.user_config_dir("engctl")) / "config.toml",
    )


@dataclass(frozen=True)
class DaemonConfig:
    """Daemon settings; every key is optional in `config.toml` under `[daemon]`."""

    sample_interval: float = 1.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    events_retention: int = 100_000
    max_frame_bytes: int = 1024 * 1024
    shutdown_timeout: float = 30.0
    default_strategy: str = "least_loaded"
    default_timeout: float = 30.0
    max_queue: int = 1000

    @classmethod
    def load(cls, path: Path) -> DaemonConfig:
        """Read `[daemon]` from a TOML file; a missing file gives the defaults."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
        doc = parse_toml(text, str(path))
        section = doc.get("daemon", {})
        if not isinstance(section, dict):
            raise SpecError(f"{path}: [daemon] must be a table")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in known:
                raise SpecError(f"{path}: daemon.{key}: unknown key {key!r}")
            default = getattr(cls, key)
            if key == "default_strategy":
                if value not in STRATEGIES:
                    raise SpecError(
                        f"{path}: daemon.{key}: expected one of {', '.join(STRATEGIES)},"
                        f" got {value!r}"
                    )
                values[key] = value
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise SpecError(f"{path}: daemon.{key}: expected a positive number, got {value!r}")
            if isinstance(default, int) and not isinstance(value, int):
                # int(0.5) would silently become 0
                raise SpecError(f"{path}: daemon.{key}: expected a positive integer, got {value!r}")
            values[key] = type(default)(value)
        return cls(**values)


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML; an error names the source with its line and column."""
    import tomllib  # only commands that read files pay for the parser

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib puts "(at line L, column C)" at the end of its message, except for errors
        # found at the end of the input ("(at end of document)"): name that place too.
        message = str(exc)
        if message.endswith("(at end of document)"):
            line = text.count("\n") + 1
            column = len(text) - text.rfind("\n")
            message = message.removesuffix(")") + f", line {line}, column {column})"
        raise SpecError(f"{source}: invalid TOML: {message}") from exc
