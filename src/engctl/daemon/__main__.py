"""`python -m engctl.daemon`: what the CLI spawns to start a background daemon."""

from engctl.daemon.main import main

main()
