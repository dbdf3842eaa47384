"""`python -m engctl` runs the CLI (imports `engctl.cli` only)."""

from engctl.cli import main

main()
