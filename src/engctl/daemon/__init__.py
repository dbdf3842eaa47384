"""The engctl daemon: socket server, registry, supervision, monitoring.

Never imported by `engctl.cli`; it imports neither typer nor rich (its memory budget is tight).
"""
