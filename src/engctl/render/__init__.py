"""Text and JSON output built from the wire documents only (`engctl.documents`), never from
daemon objects: no module of `engctl.render` imports `engctl.daemon`, the client or typer."""
