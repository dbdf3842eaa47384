"""engctl: a local engine manager (supervision, dispatch, reports).

Kept import-light: `engctl --help` loads this module, so the client is imported on demand.
"""

from __future__ import annotations

__version__ = "0.1.0"

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: importing typing costs every CLI start
if TYPE_CHECKING:
    from typing import Any

    from engctl.client import Client

__all__ = ["Client", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from engctl.client import Client

        return Client
    raise AttributeError(name)
