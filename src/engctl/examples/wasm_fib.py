"""Wasm worker: computes fibonacci(n) in a WebAssembly module run by wasmtime.

The module is `fib.wat` (WAT text shipped beside this file), compiled once at start-up.
Input: `n` as an int, a numeric string or `{"n": n}`; result `{"n": n, "fib": value}`.
Needs the `examples` extra (`pip install 'engctl[examples]'`); imports nothing from engctl
but `engctl.worker`.
"""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import wasmtime

from engctl.worker import serve

# fib(92) = 7540113804746346429 is the last Fibonacci number below 2**63; fib(93) would
# wrap around in the module's i64 arithmetic (WebAssembly integer addition never traps).
MAX_N = 92


class WasmFib:
    """One instance of the fib module: compile the WAT text, instantiate, call `fib`."""

    def __init__(self, wat: str) -> None:
        engine = wasmtime.Engine()
        self._store = wasmtime.Store(engine)
        module = wasmtime.Module(engine, wat)  # wasmtime compiles WAT text as well as binary
        instance = wasmtime.Instance(self._store, module, [])
        export = instance.exports(self._store).get("fib")
        if not isinstance(export, wasmtime.Func):
            raise RuntimeError("the wasm module does not export a function named 'fib'")
        self._fib = export

    def __call__(self, n: int) -> int:
        if not 0 <= n <= MAX_N:
            raise ValueError(f"n must be between 0 and {MAX_N} (fib({MAX_N + 1}) overflows i64)")
        result = self._fib(self._store, n)
        if not isinstance(result, int):
            raise RuntimeError(f"fib returned {type(result).__name__}, expected an i64")
        return result


def parse_n(value: Any) -> int:
    """The `n` of a request: an int, a numeric string or {"n": ...}; ValueError otherwise."""
    if isinstance(value, dict):
        if set(value) != {"n"}:
            raise ValueError(f'expected {{"n": <int>}}, got keys {sorted(value)}')
        value = value["n"]
    # bool is an int subclass, but `true` is not a number a caller meant to send.
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"n must be an integer, got the string {value!r}") from None
    raise ValueError(
        f'input must be an integer n, a numeric string or {{"n": n}}, got {type(value).__name__}'
    )


def load_wat() -> str:
    """The WAT source shipped as package data."""
    return files("engctl.examples").joinpath("fib.wat").read_text(encoding="utf-8")


def main() -> None:
    fib = WasmFib(load_wat())

    def handle(value: Any) -> dict[str, int]:
        n = parse_n(value)
        return {"n": n, "fib": fib(n)}

    serve(handle)


if __name__ == "__main__":
    main()
