"""ONNX worker: runs `tiny_linear.onnx` (y = x @ W + b, 3 inputs -> 2 outputs) with onnxruntime.

The model ships beside this file (built by `build_tiny_model.py`) and is loaded once at start-up.
Input: `{"x": [[f, f, f], ...]}` or one row `[f, f, f]`; result `{"y": [[f, f], ...]}`.
Needs the `examples` extra (`pip install 'engctl[examples]'`); imports nothing from engctl
but `engctl.worker`.
"""

from __future__ import annotations

import math
from importlib.resources import files
from typing import Any

import numpy as np
import onnxruntime

from engctl.worker import serve


def _is_number(v: Any) -> bool:
    # bool is an int subclass; NaN and infinities have no JSON spelling for the answer.
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class LinearModel:
    """An onnxruntime session over the shipped model, with the input checks it needs."""

    def __init__(self, model: bytes) -> None:
        options = onnxruntime.SessionOptions()
        # A 3x2 matrix product gains nothing from a thread pool per instance.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self._session = onnxruntime.InferenceSession(
            model, sess_options=options, providers=["CPUExecutionProvider"]
        )
        (inp,) = self._session.get_inputs()
        self._input_name = str(inp.name)
        self.features = int(inp.shape[1])

    def rows(self, value: Any) -> list[list[float]]:
        """The batch in a request: {"x": rows} or one row; ValueError on any other shape."""
        x = value
        if isinstance(value, dict):
            if set(value) != {"x"}:
                raise ValueError(f'expected {{"x": [[...], ...]}}, got keys {sorted(value)}')
            x = value["x"]
        if isinstance(x, list) and x and all(_is_number(v) for v in x):
            x = [x]
        if not isinstance(x, list) or not x:
            raise ValueError(
                f"x must be a non-empty list of rows of {self.features} numbers, "
                f"or one such row, got {type(x).__name__ if x != [] else 'an empty list'}"
            )
        for i, row in enumerate(x):
            if not isinstance(row, list) or len(row) != self.features:
                got = f"{len(row)}" if isinstance(row, list) else type(row).__name__
                raise ValueError(f"row {i}: expected {self.features} numbers, got {got}")
            bad = [v for v in row if not _is_number(v)]
            if bad:
                raise ValueError(f"row {i}: {bad[0]!r} is not a finite number")
        return x

    def __call__(self, rows: list[list[float]]) -> list[list[float]]:
        (y,) = self._session.run(None, {self._input_name: np.asarray(rows, dtype=np.float32)})
        return [[float(v) for v in row] for row in y]


def load_model() -> bytes:
    """The ONNX model shipped as package data."""
    return files("engctl.examples").joinpath("tiny_linear.onnx").read_bytes()


def main() -> None:
    model = LinearModel(load_model())

    def handle(value: Any) -> dict[str, list[list[float]]]:
        return {"y": model(model.rows(value))}

    serve(handle)


if __name__ == "__main__":
    main()
