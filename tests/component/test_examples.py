"""The wasm and onnx example engines: each started as a real worker process and spoken to over
its pipes with the worker protocol (docs/protocol.md), then run under a daemon as `engctl demo`
does. Skipped where the `examples` extra (wasmtime, onnxruntime) is not installed."""

from __future__ import annotations

import importlib.util
import itertools
import json
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from engctl.cli import demo
from engctl.examples.build_tiny_model import BIAS, WEIGHTS
from engctl.models import EngineSpec
from tests.conftest import Home

READY = {"jsonrpc": "2.0", "method": "ready"}
HANDLER_ERROR = -32000
# Start-up includes importing onnxruntime or compiling the module: seconds on a slow machine.
STARTUP_TIMEOUT = 60.0
ANSWER_TIMEOUT = 20.0


class WorkerProcess:
    """One example worker run as `python -m MODULE`, with JSON-RPC lines over its pipes."""

    def __init__(self, module: str, stderr: IO[bytes]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._ids = itertools.count(1)
        # A reader thread lets every read wait with a deadline instead of blocking for ever.
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")  # end of stream

    def read(self, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
        """The next protocol line, decoded; fails on end of stream or after `timeout`."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from the worker within {timeout}s") from None
        assert line, f"worker closed stdout (exit code {self.proc.poll()})"
        msg = json.loads(line)
        assert isinstance(msg, dict), line
        return msg

    def call(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return its response (checked to carry the same id)."""
        req_id = next(self._ids)
        req: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
        if params is not None:
            req["params"] = params
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        self.proc.stdin.flush()
        answer = self.read()
        assert answer["jsonrpc"] == "2.0" and answer["id"] == req_id, answer
        return answer

    def execute(self, value: Any) -> dict[str, Any]:
        return self.call("execute", {"input": value})

    def result(self, value: Any) -> Any:
        answer = self.execute(value)
        assert "error" not in answer, answer
        return answer["result"]

    def close(self) -> int:
        """Close stdin (the worker's cue to exit) and reap it, killing it if it lingers."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            # The process is gone, so the reader sees end of stream; join it before closing.
            self._reader.join(timeout=10)
            if self.proc.stdout is not None:
                self.proc.stdout.close()


@pytest.fixture
def run_worker(tmp_path: Path) -> Iterator[Any]:
    """Start example workers by module name (after their `ready`); all are reaped at the end."""
    started: list[WorkerProcess] = []
    logs: list[IO[bytes]] = []

    def start(module: str) -> WorkerProcess:
        log = (tmp_path / f"{module}.{len(logs)}.stderr").open("wb")
        logs.append(log)
        worker = WorkerProcess(module, log)
        started.append(worker)
        first = worker.read(timeout=STARTUP_TIMEOUT)
        assert first == READY, first
        return worker

    try:
        yield start
    finally:
        for worker in started:
            worker.close()
        for log in logs:
            log.close()


@pytest.fixture
def wasm(run_worker: Any) -> WorkerProcess:
    pytest.importorskip("wasmtime")
    worker: WorkerProcess = run_worker("engctl.examples.wasm_fib")
    return worker


@pytest.fixture
def onnx(run_worker: Any) -> WorkerProcess:
    pytest.importorskip("onnxruntime")
    worker: WorkerProcess = run_worker("engctl.examples.onnx_model")
    return worker


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def assert_handler_error(answer: dict[str, Any], *fragments: str) -> None:
    """A JSON-RPC error object from the handler whose message names the problem."""
    assert "result" not in answer, answer
    error = answer["error"]
    assert error["code"] == HANDLER_ERROR, answer
    assert error["message"].startswith("ValueError: "), answer
    for fragment in fragments:
        assert fragment in error["message"], answer


# -- wasm ----------------------------------------------------------------------------------
def test_wasm_fib_of_10_is_55(wasm: WorkerProcess) -> None:
    """The wasm worker computes fib(10) = 55 in the WebAssembly module."""
    assert wasm.result(10) == {"n": 10, "fib": 55}


def test_wasm_accepts_int_string_and_object(wasm: WorkerProcess) -> None:
    """n may be sent as an int, a numeric string or {"n": n}, with the same answer."""
    assert wasm.result("20") == {"n": 20, "fib": 6765}
    assert wasm.result({"n": 20}) == {"n": 20, "fib": 6765}
    assert wasm.result(0) == {"n": 0, "fib": 0}
    assert wasm.result(1) == {"n": 1, "fib": 1}


def test_wasm_fib_is_exact_up_to_the_i64_limit(wasm: WorkerProcess) -> None:
    """fib(90) and fib(92), the largest Fibonacci number in an i64, are exact."""
    assert wasm.result(90) == {"n": 90, "fib": fib(90)}
    assert fib(90) == 2880067194370816120
    assert wasm.result(92) == {"n": 92, "fib": fib(92)}
    assert fib(92) < 2**63 <= fib(93)


def test_wasm_bad_input_is_an_error_object(wasm: WorkerProcess) -> None:
    """Overflowing, negative and non-integer inputs get JSON-RPC errors; the worker goes on."""
    assert_handler_error(wasm.execute(93), "between 0 and 92")
    assert_handler_error(wasm.execute(-1), "between 0 and 92")
    assert_handler_error(wasm.execute("ten"), "'ten'")
    assert_handler_error(wasm.execute(True), "bool")
    assert_handler_error(wasm.execute(2.5), "float")
    assert_handler_error(wasm.execute({"m": 3}), "['m']")
    assert wasm.result(12) == {"n": 12, "fib": 144}


def test_wasm_answers_ping(wasm: WorkerProcess) -> None:
    """The wasm worker answers the health-check ping."""
    assert "result" in wasm.call("ping")


# -- onnx ----------------------------------------------------------------------------------
def expected_y(x: list[list[float]]) -> Any:
    """x @ W + b in float32 with numpy, from the weights the model was built from."""
    np = pytest.importorskip("numpy")
    w = np.asarray(WEIGHTS, dtype=np.float32)
    b = np.asarray(BIAS, dtype=np.float32)
    return np.asarray(x, dtype=np.float32) @ w + b


def test_onnx_batch_matches_numpy(onnx: WorkerProcess) -> None:
    """The onnx worker's y for a batch equals numpy's x @ W + b."""
    np = pytest.importorskip("numpy")
    x = [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [-0.3, 0.7, 12.5], [1e3, -2e-3, 0.1]]
    y = onnx.result({"x": x})["y"]
    assert isinstance(y, list) and all(isinstance(v, float) for row in y for v in row)
    np.testing.assert_allclose(np.asarray(y), expected_y(x), rtol=1e-6, atol=1e-6)


def test_onnx_single_row(onnx: WorkerProcess) -> None:
    """A single row [f, f, f] is a batch of one, answered as {"y": [[f, f]]}."""
    np = pytest.importorskip("numpy")
    y = onnx.result([1, -2, 0.5])["y"]
    assert len(y) == 1 and len(y[0]) == len(BIAS)
    np.testing.assert_allclose(np.asarray(y), expected_y([[1, -2, 0.5]]), rtol=1e-6, atol=1e-6)


def test_onnx_bad_shapes_are_error_objects(onnx: WorkerProcess) -> None:
    """Wrong row lengths, empty input, non-numbers and wrong keys get clear JSON-RPC errors."""
    assert_handler_error(onnx.execute([1.0, 2.0]), "row 0", "expected 3 numbers", "got 2")
    assert_handler_error(onnx.execute({"x": [[1, 2, 3], [4, 5]]}), "row 1", "got 2")
    assert_handler_error(onnx.execute({"x": []}), "non-empty")
    assert_handler_error(onnx.execute({"x": [[1, "a", 3]]}), "'a' is not a finite number")
    assert_handler_error(onnx.execute({"x": [[1, True, 3]]}), "True")
    assert_handler_error(onnx.execute({"input": [[1, 2, 3]]}), "['input']")
    assert_handler_error(onnx.execute("1,2,3"), "str")
    assert onnx.result([0, 0, 0]) == {"y": [BIAS]}


def test_onnx_answers_ping(onnx: WorkerProcess) -> None:
    """The onnx worker answers the health-check ping."""
    assert "result" in onnx.call("ping")


def test_workers_exit_cleanly_when_stdin_closes(wasm: WorkerProcess, onnx: WorkerProcess) -> None:
    """Both workers exit with status 0 once their stdin is closed."""
    assert wasm.close() == 0
    assert onnx.close() == 0


def test_shipped_model_is_what_the_build_script_builds() -> None:
    """tiny_linear.onnx is byte for byte the model build_tiny_model.py builds from its weights."""
    pytest.importorskip("onnx")
    from engctl.examples import build_tiny_model

    assert build_tiny_model.MODEL_PATH.read_bytes() == build_tiny_model.build()


# -- demo ----------------------------------------------------------------------------------
def test_demo_registers_optional_engines_only_when_importable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """demo-wasm and demo-onnx are valid specs, offered only where their package is found."""
    real_find_spec = importlib.util.find_spec

    def without_extra(name: str, package: str | None = None) -> Any:
        return None if name in ("wasmtime", "onnxruntime") else real_find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without_extra)
    assert demo.missing_optional_engines() == {
        "demo-wasm": "wasmtime",
        "demo-onnx": "onnxruntime",
    }
    assert not {"demo-wasm", "demo-onnx"} & set(demo.demo_engines())
    monkeypatch.undo()

    engines = demo.demo_engines()
    for name, package in (("demo-wasm", "wasmtime"), ("demo-onnx", "onnxruntime")):
        assert (name in engines) == (importlib.util.find_spec(package) is not None)
    specs = {name: EngineSpec.from_dict(name, data) for name, data in engines.items()}
    if "demo-wasm" in specs:
        assert specs["demo-wasm"].type == "wasm"
        assert specs["demo-wasm"].command[-1] == "engctl.examples.wasm_fib"
    if "demo-onnx" in specs:
        assert specs["demo-onnx"].type == "onnx"
        assert specs["demo-onnx"].command[-1] == "engctl.examples.onnx_model"


def test_example_engines_become_ready_under_the_daemon(daemon: Home) -> None:
    """Registered as `engctl demo` registers them, both example workers reach `ready`."""
    pytest.importorskip("wasmtime")
    pytest.importorskip("onnxruntime")
    engines = demo.demo_engines()
    with daemon.client() as c:
        c.register({name: engines[name] for name in ("demo-wasm", "demo-onnx")})
    for inst in ("demo-wasm#0", "demo-onnx#0"):
        ready = daemon.wait_state(inst, "ready", "fatal", "exited", timeout=STARTUP_TIMEOUT)
        assert ready["state"] == "ready", ready
