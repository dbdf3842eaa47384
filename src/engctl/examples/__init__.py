"""Example engines bundled with engctl (used by `engctl demo`)."""
