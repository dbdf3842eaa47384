"""Where engctl keeps its files: socket, state, logs and config of one home.

Shared contract between CLI and daemon, on every command's start-up path: stdlib only, and
light (no dataclasses or typing at run time; pathlib and platformdirs only when needed, so
`engctl exec` reaches the socket with plain strings).
`ENGCTL_HOME` puts everything under one folder; otherwise platformdirs decides.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing and pathlib stay off the CLI's start-up path
if TYPE_CHECKING:
    from pathlib import Path

# AF_UNIX socket paths are limited to 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


class Paths:
    """The folders of one engctl home (as Path objects; `socket_file` as a plain string)."""

    __slots__ = ("_config", "_log", "_runtime", "_state", "home")

    def __init__(
        self,
        runtime_dir: str | os.PathLike[str],
        state_dir: str | os.PathLike[str],
        log_dir: str | os.PathLike[str],
        config_file: str | os.PathLike[str],
        home: str | None = None,
    ) -> None:
        self._runtime = os.fspath(runtime_dir)
        self._state = os.fspath(state_dir)
        self._log = os.fspath(log_dir)
        self._config = os.fspath(config_file)
        # The one folder holding the others (ENGCTL_HOME), or None for the platform folders.
        self.home = home

    def _key(self) -> tuple[str, str, str, str]:
        return (self._runtime, self._state, self._log, self._config)

    def __repr__(self) -> str:
        return "Paths(runtime_dir={!r}, state_dir={!r}, log_dir={!r}, config_file={!r})".format(
            *self._key()
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Paths):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    @property
    def socket_file(self) -> str:
        """The socket path as a string: what a client needs, without importing pathlib."""
        return os.path.join(self._runtime, "engctl.sock")

    @property
    def runtime_dir(self) -> Path:
        return _path(self._runtime)

    @property
    def state_dir(self) -> Path:
        return _path(self._state)

    @property
    def log_dir(self) -> Path:
        return _path(self._log)

    @property
    def config_file(self) -> Path:
        return _path(self._config)

    @property
    def socket(self) -> Path:
        return _path(self.socket_file)

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
    def history_db(self) -> Path:
        return self.state_dir / "history.sqlite3"

    @property
    def daemon_log(self) -> Path:
        return self.state_dir / "daemon.log"

    @property
    def daemon_id(self) -> str:
        """Marks this home's engine processes (in their environment) for re-discovery.

        The state folder itself: unique per home, and readable in `ps e` output.
        """
        return self._state

    def instance_log(self, engine: str, index: int) -> Path:
        return self.log_dir / f"{engine}.{index}.log"

    @property
    def where(self) -> str:
        """How messages name this home: ENGCTL_HOME, or the runtime folder of the user's."""
        return self.home or self._runtime

    def roots(self) -> list[tuple[str, bool]]:
        """The folders to check before use, outermost first, with whether each is a root
        (the home itself or a platform folder: it may be a symlink of ours)."""
        if self.home is not None:
            inner = [(self._runtime, False), (self._state, False), (self._log, False)]
            return [(self.home, True), *inner]
        inside = self._state + os.sep
        return [(d, not d.startswith(inside)) for d in (self._state, self._runtime, self._log)]


def _path(text: str) -> Path:
    from pathlib import Path

    return Path(text)


def resolve_paths(home: str | os.PathLike[str] | None = None) -> Paths:
    """Paths from an explicit home, else `ENGCTL_HOME`, else platformdirs' user folders."""
    home = home or os.environ.get("ENGCTL_HOME")
    if home:
        root = os.path.abspath(os.path.expanduser(os.fspath(home)))
        join = os.path.join
        return Paths(
            join(root, "run"),
            join(root, "state"),
            join(root, "logs"),
            join(root, "config.toml"),
            home=root,
        )
    import warnings

    import platformdirs

    with warnings.catch_warnings():
        # A library's warning never reaches the user (it would name a site-packages path).
        warnings.simplefilter("ignore")
        state = platformdirs.user_state_dir("engctl")
        return Paths(
            runtime_dir=_runtime_dir(state),
            state_dir=state,
            log_dir=platformdirs.user_log_dir("engctl"),
            config_file=os.path.join(platformdirs.user_config_dir("engctl"), "config.toml"),
        )


def _runtime_dir(state_dir: str) -> str:
    """`$XDG_RUNTIME_DIR/engctl` when that folder is private to us, else `STATE/run`.

    platformdirs would fall back to `/tmp/runtime-UID` with a warning; the state folder is
    ours already, and no other user can take its name first.
    """
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
        except OSError:
            st = None
        import stat

        private = st is not None and st.st_uid == os.geteuid() and not st.st_mode & 0o077
        if private and st is not None and stat.S_ISDIR(st.st_mode):
            return os.path.join(xdg, "engctl")
    return os.path.join(state_dir, "run")
