"""Worker whose every 2nd request fails with an exception (the 1st, 3rd, ... succeed)."""

from engctl.worker import serve

count = 0


def handle(value: object) -> object:
    global count
    count += 1
    if count % 2 == 0:
        raise RuntimeError(f"flaky failure on request {count}")
    return {"echo": value, "n": count}


if __name__ == "__main__":
    serve(handle)
