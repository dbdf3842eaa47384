"""Worker that echoes its input (uses engctl.worker)."""

from engctl.worker import serve

if __name__ == "__main__":
    serve(lambda value: {"echo": value})
