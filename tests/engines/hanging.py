"""Worker that answers ping, echoes its input, but never answers `execute` of "hang".

The handler is async so a hung request does not block pings or other requests.
"""

import asyncio

from engctl.worker import serve


async def handle(value: object) -> object:
    if value == "hang":
        await asyncio.Event().wait()  # never set
    return {"echo": value}


if __name__ == "__main__":
    serve(handle)
