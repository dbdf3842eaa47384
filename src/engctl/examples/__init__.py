"""Example engines bundled with engctl (used by `engctl demo`): each imports `engctl.worker` at
most, never the CLI or the daemon."""
