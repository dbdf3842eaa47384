"""The one exception hierarchy, mapped to JSON-RPC error codes and CLI exit codes here only.

Shared contract between CLI and daemon: stdlib only.

Exit codes (documented in docs/cli.md, the JSON-RPC codes in docs/protocol.md):
0 ok · 1 failed · 2 usage or invalid input · 3 daemon unreachable or incompatible ·
4 no eligible engine · 5 timeout · 6 busy · 7 not found · 8 lease not held · 9 rate limited ·
130 interrupted (Ctrl-C) · 141 stdout closed by its reader
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from typing import Any, ClassVar

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NO_ELIGIBLE = 4
EXIT_TIMEOUT = 5
EXIT_BUSY = 6
EXIT_NOT_FOUND = 7
EXIT_LEASE = 8
EXIT_RATE_LIMITED = 9
# As a shell reports a command ended by a signal (128 + its number): Ctrl-C, and a reader
# that went away (`engctl events | head -1`).
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141

# JSON-RPC 2.0 reserved codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


class EngctlError(Exception):
    """Base of every error engctl reports; carries its wire code and exit code."""

    rpc_code: ClassVar[int] = -32000
    exit_code: ClassVar[int] = EXIT_FAILED

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data or {}

    def to_wire(self) -> dict[str, Any]:
        """The JSON-RPC `error` member for this error."""
        err: dict[str, Any] = {"code": self.rpc_code, "message": self.message}
        if self.data:
            err["data"] = self.data
        return err


class ProtocolError(EngctlError):
    """A frame that is not valid JSON-RPC (garbage, oversized, wrong shape)."""

    rpc_code = INVALID_REQUEST
    exit_code = EXIT_FAILED


class ParseError(ProtocolError):
    """A frame that is not JSON."""

    rpc_code = PARSE_ERROR


class MethodNotFoundError(EngctlError):
    """The daemon has no such RPC method."""

    rpc_code = METHOD_NOT_FOUND
    exit_code = EXIT_UNREACHABLE


class InvalidParamsError(EngctlError):
    """Parameters of a call are missing or of the wrong type."""

    rpc_code = INVALID_PARAMS
    exit_code = EXIT_USAGE


class SpecError(InvalidParamsError):
    """An engine spec or file that does not validate; message names the field or line."""

    rpc_code = -32010


class UsageError(EngctlError):
    """A command used wrongly (bad flag value, conflicting options)."""

    rpc_code = -32011
    exit_code = EXIT_USAGE


class NotFoundError(EngctlError):
    """An engine or instance that is not registered."""

    rpc_code = -32001
    exit_code = EXIT_NOT_FOUND


class EngineNotFoundError(NotFoundError):
    """No engine of that name."""

    rpc_code = -32002


class InstanceNotFoundError(NotFoundError):
    """The engine exists but has no instance with that index."""

    rpc_code = -32003


class DaemonUnreachableError(EngctlError):
    """No daemon answers on the socket and none could be started."""

    rpc_code = -32020
    exit_code = EXIT_UNREACHABLE


class IncompatibleDaemonError(DaemonUnreachableError):
    """The daemon speaks another protocol version."""

    rpc_code = -32021


class PermissionDeniedError(DaemonUnreachableError):
    """The daemon refused this connection: it serves only its own uid."""

    rpc_code = -32022


class DaemonNotRunningError(DaemonUnreachableError):
    """No daemon runs for the home, and the command does not start one."""

    rpc_code = -32023


class UnsafePathError(EngctlError):
    """A folder or file of the home that another user could control (or a symlink there)."""

    rpc_code = -32024
    exit_code = EXIT_UNREACHABLE


class StorageError(EngctlError):
    """A change the daemon could not make durable (e.g. no space left on device)."""

    rpc_code = -32040
    exit_code = EXIT_FAILED


class RequestFailedError(EngctlError):
    """A dispatched request failed on the engine."""

    rpc_code = -32030
    exit_code = EXIT_FAILED


class NoEligibleEngineError(EngctlError):
    """No instance passes the filters of a request."""

    rpc_code = -32031
    exit_code = EXIT_NO_ELIGIBLE


class RequestTimeoutError(EngctlError):
    """A request or a wait passed its deadline."""

    rpc_code = -32032
    exit_code = EXIT_TIMEOUT


class BusyError(EngctlError):
    """A full queue refused the request (backpressure)."""

    rpc_code = -32033
    exit_code = EXIT_BUSY


class LeaseError(EngctlError):
    """A lease that is not held (any more): unknown, expired, released, ended with its
    instance, or held with a daemon that has restarted since (a restart ends every lease)."""

    rpc_code = -32050
    exit_code = EXIT_LEASE


class RolloutInProgressError(BusyError):
    """`reload` of an engine whose rollout is still under way (wait for it, or watch it)."""

    rpc_code = -32035


class RolloutFailedError(EngctlError):
    """A rollout stopped: a new process failed to start or become ready; the old ones serve."""

    rpc_code = -32051
    exit_code = EXIT_FAILED


class RateLimitedError(EngctlError):
    """A rate limit (engine, type or caller) refused the request: no token before its deadline."""

    rpc_code = -32034
    exit_code = EXIT_RATE_LIMITED


class InternalError(EngctlError):
    """A bug in the daemon; the message points at its log."""

    rpc_code = INTERNAL_ERROR
    exit_code = EXIT_FAILED


def _all_subclasses(cls: type[EngctlError]) -> list[type[EngctlError]]:
    out: list[type[EngctlError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[int, type[EngctlError]] = {}
_ALL: list[type[EngctlError]] = [EngctlError, *_all_subclasses(EngctlError)]
for _cls in _ALL:
    _BY_CODE.setdefault(_cls.rpc_code, _cls)


def from_wire(error: dict[str, Any]) -> EngctlError:
    """Rebuild the exception a daemon sent as a JSON-RPC `error` member."""
    code = error.get("code")
    message = str(error.get("message", "unknown error"))
    data = error.get("data") if isinstance(error.get("data"), dict) else None
    cls = _BY_CODE.get(code, EngctlError) if isinstance(code, int) else EngctlError
    return cls(message, data)
