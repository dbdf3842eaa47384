"""`python -m engctl.daemon`: what the CLI spawns to start a background daemon.

Imports `main` only, after blocking what the daemon must never load.
"""

import sys

# asyncio imports ssl when it can, which maps OpenSSL: about 8 MiB of RSS for a daemon that
# speaks no TLS. Blocking the import keeps the daemon within its memory budget.
sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]

from engctl.daemon.main import main  # noqa: E402

main()
