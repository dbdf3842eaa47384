"""The trust rules of an engctl home (OpenSSH's StrictModes): which folders and files it uses.

A folder or file of a home is used only when it belongs to the user engctl runs as (or to
root) and nobody else may write to it, and engctl never follows a symlink inside a home.
Files are opened with O_NOFOLLOW and checked on the open descriptor, so nothing can change
between the check and the use. The parents of a home are not checked (as sshd stops at the
home directory): a home under a sticky `/tmp` is fine. Shared contract of CLI and daemon:
stdlib only, light (on every start-up path).
"""

from __future__ import annotations

import errno
import os
import stat

from engctl.errors import DaemonUnreachableError, UnsafePathError

_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a planted FIFO
# Modes a foreign hand could write through.
_WRITABLE_BY_OTHERS = stat.S_IWGRP | stat.S_IWOTH


def _owner_problem(st: os.stat_result, path: str, what: str) -> str | None:
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        return (
            f"{path} is owned by uid {st.st_uid}, not by you (uid {euid}): engctl does not use"
            f" a {what} another user controls (`chown {euid} {path}` if it is yours, or use"
            " another ENGCTL_HOME)"
        )
    if st.st_mode & _WRITABLE_BY_OTHERS:
        return (
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}):"
            f" engctl does not use it (`chmod go-w {path}`)"
        )
    return None


def _symlink(path: str) -> str:
    return f"{path} is a symlink: engctl never follows symlinks in its home (remove it)"


def path_problem(path: str, kind: str = "file") -> str | None:
    """Why `path` (a `file`, `socket` or `folder` inside a home) may not be used; None if it
    may, or does not exist."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return _symlink(path)
    test = {"file": stat.S_ISREG, "socket": stat.S_ISSOCK, "folder": stat.S_ISDIR}[kind]
    if not test(st.st_mode):
        return f"{path} is not a {'regular file' if kind == 'file' else kind}"
    return _owner_problem(st, path, kind)


def check_path(path: str, kind: str = "file") -> bool:
    """Raise UnsafePathError if `path` may not be used; return whether it exists."""
    problem = path_problem(path, kind)
    if problem is not None:
        raise UnsafePathError(problem)
    return os.path.lexists(path)


def check_followed(path: str) -> None:
    """Check a file that may be a symlink (config.toml): what it points to must be ours.

    FileNotFoundError when it does not exist; IsADirectoryError for a folder.
    """
    check_folder(os.path.dirname(path) or ".", root=True)
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder", path)
    problem = _owner_problem(st, path, "file")
    if problem is not None:
        raise UnsafePathError(problem)


def check_folder(path: str, root: bool = False) -> bool:
    """Check a folder of a home; return whether it exists.

    `root`: the home itself (or a platform folder), which may be a symlink of ours: the
    folder it points to is then what must be ours.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        if not root:
            raise UnsafePathError(_symlink(path))
        if st.st_uid not in (os.geteuid(), 0):
            raise UnsafePathError(_owner_problem(st, path, "symlink") or _symlink(path))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{path} is not a folder")
    problem = _owner_problem(st, path, "folder")
    if problem is not None:
        raise UnsafePathError(problem)
    return True


def check_folders(roots: list[tuple[str, bool]], folder: str) -> None:
    """Check `folder` and the folders of a home that hold it (`Paths.roots()`)."""
    for path, root in roots:
        if folder == path or folder.startswith(path + "/"):
            check_folder(path, root)


def ensure_folder(path: str, private: bool = False, root: bool = False) -> None:
    """Create a folder of a home if missing (0700), then check it; `private` makes it 0700."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DaemonUnreachableError(f"cannot create {path}: {exc.strerror or exc}") from exc
    check_folder(path, root=root)
    if private:
        # Through a descriptor of the folder itself: chmod by name would follow a symlink.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | (0 if root else os.O_NOFOLLOW))
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != 0o700:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """`os.open` for a file of a home: never through a symlink, only a regular file of ours."""
    try:
        fd = os.open(path, flags | _OPEN_FLAGS, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(_symlink(path)) from exc
        raise
    try:
        st = os.fstat(fd)
        problem = (
            _owner_problem(st, path, "file")
            if stat.S_ISREG(st.st_mode)
            else f"{path} is not a regular file"
        )
    except BaseException:
        os.close(fd)
        raise
    if problem is not None:
        os.close(fd)
        raise UnsafePathError(problem)
    return fd


def read_file(path: str) -> bytes:
    """The whole content of a file of a home (FileNotFoundError when missing)."""
    fd = open_file(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as f:
        return f.read()
