"""`python -m engctl` runs the CLI."""

from engctl.cli import main

main()
