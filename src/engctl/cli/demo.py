"""`engctl demo`: start the daemon, register the bundled example engines, show their status."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from typing import Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import client, console, finite, out
from engctl.errors import EngctlError

# Optional example engines: name -> (type, module, the package its module needs).
# They are registered only where the `examples` extra is installed.
OPTIONAL_ENGINES = {
    "demo-wasm": ("wasm", "engctl.examples.wasm_fib", "wasmtime"),
    "demo-onnx": ("onnx", "engctl.examples.onnx_model", "onnxruntime"),
}
EXAMPLES_INSTALL = "pip install 'engctl[examples]'"


def missing_optional_engines() -> dict[str, str]:
    """The optional example engines that cannot run here, each with the package it lacks."""
    # find_spec looks the package up without importing it (onnxruntime takes ~0.3 s to import).
    return {
        name: package
        for name, (_, _, package) in OPTIONAL_ENGINES.items()
        if importlib.util.find_spec(package) is None
    }


def demo_engines() -> dict[str, dict[str, object]]:
    """The example engines, run by this Python (so they work in any venv)."""
    py = sys.executable
    engines: dict[str, dict[str, object]] = {
        "demo-echo": {
            "type": "echo",
            "mode": "worker",
            "command": [py, "-m", "engctl.examples.echo_worker"],
            "instances": 2,
            "capabilities": ["json"],
            "restart": {"start_seconds": 0.5},
        },
        "demo-web": {
            "type": "http",
            "mode": "service",
            "command": [py, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
            "restart": {"start_seconds": 0.5},
            "stop": {"timeout": 5.0},
        },
        "demo-clock": {
            "type": "clock",
            "mode": "service",
            "command": [py, "-m", "engctl.examples.clock_service"],
            "depends_on": ["demo-web"],
            "restart": {"start_seconds": 0.5, "policy": "always"},
        },
    }
    missing = missing_optional_engines()
    for name, (engine_type, module, _) in OPTIONAL_ENGINES.items():
        if name not in missing:
            engines[name] = {
                "type": engine_type,
                "mode": "worker",
                "command": [py, "-m", module],
                "restart": {"start_seconds": 0.5},
            }
    return engines


# One request per dispatchable example, shown after the status table.
DEMO_REQUESTS: dict[str, object] = {
    "demo-echo": {"hello": "engctl"},
    "demo-wasm": {"n": 30},
    "demo-onnx": {"x": [1.0, 2.0, 3.0]},
}


@app.command()
def demo(
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the engines to be ready.", callback=finite)
    ] = 20.0,
) -> None:
    """Register the bundled example engines (echo, web, clock; wasm and onnx) and show status."""
    c = client(autostart=True)
    result = c.register(demo_engines())
    for r in result["engines"]:
        out(f"{r['action']:9} {r['name']}")
    names = list(demo_engines())
    deadline = time.monotonic() + timeout
    st = c.status(names)
    while time.monotonic() < deadline:
        st = c.status(names)
        states = [i["state"] for e in st["engines"] for i in e["instances"]]
        if states and all(s in ("ready", "busy", "fatal", "exited") for s in states):
            break
        time.sleep(0.1)
    from engctl.render.tables import status_view

    con = console()
    con.print(status_view(st, con.width))
    out("")
    engines = demo_engines()
    for name, payload in DEMO_REQUESTS.items():
        if name not in engines:
            continue
        shown = json.dumps(payload)
        try:
            obj = c.exec(payload, engine=name, timeout=10)
            answer = (
                f"{json.dumps(obj['result'])}   ({obj['instance']}, {obj['latency_ms']:.2f} ms)"
            )
        except EngctlError as exc:
            answer = f"failed: {exc.message}"
        out(f"engctl exec --engine {name} -- '{shown}'  ->  {answer}")
    out("")
    missing = missing_optional_engines()
    if missing:
        needs = ", ".join(f"{name} (needs {package})" for name, package in missing.items())
        out(f"skipped: {needs}; enable with: {EXAMPLES_INSTALL}")
    out("next:    engctl logs demo-clock -f    engctl events -f    engctl stop demo-web")
    out("         engctl exec --type echo --explain -- 42    engctl export > engines.toml")
    out("         engctl top    engctl report --since 10m    engctl policy show demo-echo")
    out("         engctl reload demo-echo    engctl alerts    engctl lease acquire --type echo")
    out(f"         engctl unregister {' '.join(engines)}")
