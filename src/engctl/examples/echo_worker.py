"""Echo worker: answers every `execute` with its input (a worker engine in a few lines)."""

from engctl.worker import serve


def handle(value: object) -> object:
    return {"echo": value}


if __name__ == "__main__":
    serve(handle)
