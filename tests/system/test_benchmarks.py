"""Every script in benchmarks/ runs its `--quick` mode to the end and prints one JSON object,
so none of them rots between the runs that measure (their figures are not checked here)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
# Imported or run by the scripts, not run on their own.
HELPERS = {"common.py", "faulty_worker.py", "knee_worker.py"}
# Each script's smoke run: `--quick`, narrowed further where a quick run still takes most of a
# minute. overhead needs a full 10 s history bucket, so ~20 s of idle windows.
SMOKE_ARGS = {
    "admission.py": ["--quick", "--seconds", "1"],
    "cli.py": ["--quick"],
    "dispatch.py": ["--quick"],
    "durability.py": ["--quick", "--rounds", "2"],
    "elastic.py": ["--quick"],
    "faults.py": ["--quick", "--faults", "crash,failing"],
    "overhead.py": [
        "--quick", "--instances", "4", "--warmup", "0", "--idle-seconds", "17",
        "--scrape-seconds", "3", "--rounds", "3", "--requests", "300",
    ],
    "reload.py": ["--quick"],
    "peers.py": ["--quick", "--rounds", "1"],
    "selection.py": ["--quick"],
    "supervise.py": ["--quick"],
}  # fmt: skip


def test_every_benchmark_script_has_a_smoke_run() -> None:
    """A script added to benchmarks/ is run here too (or named a helper)."""
    assert {p.name for p in BENCHMARKS.glob("*.py")} - HELPERS == set(SMOKE_ARGS)


@pytest.mark.benchmark_smoke
@pytest.mark.parametrize("script", sorted(SMOKE_ARGS))
def test_benchmark_quick_run_exits_0_and_prints_json(script: str) -> None:
    """The script's quick run exits 0 and its stdout is one JSON object."""
    r = subprocess.run(
        [PY, str(BENCHMARKS / script), *SMOKE_ARGS[script]],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict) and doc, r.stdout[:500]
