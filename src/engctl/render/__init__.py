"""Text and JSON output built from the wire models only (never from daemon objects)."""
