"""Builds `tiny_linear.onnx`, the model of the onnx example worker: y = x @ WEIGHTS + BIAS.

Run by hand, once, when the weights change (never at install or at run time):
    pip install onnx && python -m engctl.examples.build_tiny_model
`onnx` is needed only here; the worker needs just onnxruntime. WEIGHTS and BIAS are the
source of truth: the tests compute the expected output from them. Imports nothing from engctl.
"""

from __future__ import annotations

import sys
from pathlib import Path

MODEL_PATH = Path(__file__).with_name("tiny_linear.onnx")

# float32 weights: 3 inputs -> 2 outputs. Values exact in binary so the file is reproducible.
WEIGHTS: list[list[float]] = [
    [0.5, -1.0],
    [0.25, 2.0],
    [-1.5, 0.75],
]
BIAS: list[float] = [0.125, -0.5]

# IR version 8 with opset 13 loads in every onnxruntime the `examples` extra allows (>= 1.17).
IR_VERSION = 8
OPSET = 13


def build() -> bytes:
    """The serialized model: MatMul(x, W) + b, with a dynamic batch dimension."""
    import onnx
    from onnx import TensorProto, helper

    n_in, n_out = len(WEIGHTS), len(BIAS)
    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["x", "W"], ["xW"]),
            helper.make_node("Add", ["xW", "b"], ["y"]),
        ],
        name="tiny_linear",
        inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])],
        initializer=[
            helper.make_tensor(
                "W", TensorProto.FLOAT, [n_in, n_out], [v for row in WEIGHTS for v in row]
            ),
            helper.make_tensor("b", TensorProto.FLOAT, [n_out], BIAS),
        ],
    )
    model = helper.make_model(
        graph,
        producer_name="engctl.examples.build_tiny_model",
        ir_version=IR_VERSION,
        opset_imports=[helper.make_opsetid("", OPSET)],
    )
    onnx.checker.check_model(model, full_check=True)
    return bytes(model.SerializeToString())


def main() -> None:
    data = build()
    MODEL_PATH.write_bytes(data)
    print(f"wrote {MODEL_PATH} ({len(data)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
