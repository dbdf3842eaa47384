"""Worker whose result is a string of `n` "x" characters for an input `n`: large results."""

from engctl.worker import serve

if __name__ == "__main__":
    serve(lambda n: "x" * int(n))
