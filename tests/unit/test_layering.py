"""The layers of `src/engctl`, read from the source (absolute and relative imports, at any depth
of a module, `TYPE_CHECKING` blocks included): the CLI never imports the daemon, the shared
contract imports the stdlib only, each daemon module imports only the daemon modules its header
allows, selection's private slots stay in its package, and long modules say why (issue 11)."""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "engctl"

# The shared contract between the CLI and the daemon (docs/architecture.md).
SHARED = {
    "engctl.admission_config",
    "engctl.alertexpr",
    "engctl.alerting",
    "engctl.config",
    "engctl.documents",
    "engctl.errors",
    "engctl.finite",
    "engctl.histogram",
    "engctl.homefiles",
    "engctl.models",
    "engctl.paths",
    "engctl.policy_config",
    "engctl.protocol",
    "engctl.states",
    "engctl.timespec",
    "engctl.trust",
}
# What the contract may import besides the stdlib: `from __future__`, and platformdirs (the
# user folders, imported by `paths` only when ENGCTL_HOME is not set).
OUTSIDE_STDLIB = {"__future__", "platformdirs", "orjson", "msgspec"}
# The daemon modules each daemon module may import (what its header says). A new module, or a
# new dependency, is a decision: it is written here.
D = "engctl.daemon"
SELECTION = {
    f"{D}.selection",
    f"{D}.selection.candidates",
    f"{D}.selection.explain",
    f"{D}.selection.pool",
    f"{D}.selection.selector",
    f"{D}.selection.strategies",
    f"{D}.selection.strategies.base",
    f"{D}.selection.strategies.capability",
    f"{D}.selection.strategies.keyed",
    f"{D}.selection.strategies.load",
    f"{D}.selection.strategies.rotation",
}
# Admission control (issue 15): pure, like selection.
ADMISSION = {
    f"{D}.admission",
    f"{D}.admission.bucket",
    f"{D}.admission.gates",
    f"{D}.admission.gradient",
    f"{D}.admission.queue",
}
MAY_IMPORT: dict[str, set[str]] = {
    # pure decisions and plain records
    "policies": set(),
    "alerts": set(),
    "backoff": {"policies"},
    "standby": {"selection"},
    "autoscale": set(),
    "rollout_plan": set(),
    "stats": set(),
    "tasks": set(),
    "output": set(),
    "params": set(),
    "options": set(),
    # mechanism: processes, pipes, files, sockets
    "process": set(),
    "proctree": {"process"},
    "memory": set(),
    "pipes": set(),
    "monitor": {"process", "proctree"},
    "server": set(),
    "storage": set(),
    "logs": {"storage"},
    "events": {"storage"},
    "history": {"storage"},
    "registry": {"storage"},
    "oneshot": {"logs", "output", "process"},
    "health": {"oneshot", "process"},
    # supervision
    "instance": {"backoff", "logs", "monitor", "process", "registry", "stats"},
    "supervisor": {
        "backoff",
        "events",
        "instance",
        "logs",
        "monitor",
        "policies",
        "process",
        "proctree",
        "storage",
    },
    "rollout": {"instance", "process", "rollout_plan", "supervisor", "tasks"},
    "fleet": {"instance", "logs", "rollout", "supervisor"},
    # requests
    "request": {"admission", "selection", "server", "stats"},
    "deadlines": {"request"},
    "channel": {"instance", "output", "pipes", "process", "request", "server"},
    "dispatch": {
        "channel",
        "instance",
        "oneshot",
        "output",
        "pipes",
        "process",
        "request",
        "selection",
        "server",
        "supervisor",
    },
    "gatekeeper": {"admission", "request", "selection"},
    "router": {
        "admission",
        "deadlines",
        "dispatch",
        "gatekeeper",
        "instance",
        "request",
        "selection",
        "server",
        "standby",
        "stats",
        "supervisor",
    },
    "membership": {"dispatch", "instance", "process", "router", "selection", "supervisor"},
    # elastic pools: the autoscaler's controller, and the leases
    "scaler": {
        "autoscale",
        "events",
        "fleet",
        "history",
        "instance",
        "monitor",
        "request",
        "router",
        "standby",
        "supervisor",
        "tasks",
    },
    "leases": {"events", "instance", "scaler", "selection", "standby", "supervisor"},
    # the failure policies' enforcement
    "enforcer": {
        *("dispatch", "events", "health", "instance", "monitor", "policies", "supervisor"),
        "tasks",
    },
    # alert rules on the policy tick, and the hooks that hear every event
    "alerter": {"alerts", "events", "instance", "metrics", "router", "supervisor"},
    "hooks": {"events", "oneshot"},
    # figures and the RPC surface
    "metrics": {"history", "instance", "monitor", "router", "stats", "supervisor"},
    "prometheus": {"alerter", "hooks", "monitor", "router", "stats", "supervisor"},
    "engine_calls": {
        "enforcer",
        "events",
        "fleet",
        "instance",
        "membership",
        "params",
        "registry",
        "scaler",
        "rollout",
        "selection",
        "server",
        "supervisor",
    },
    "api": {
        "alerter",
        "engine_calls",
        "events",
        "hooks",
        "instance",
        "leases",
        "logs",
        "metrics",
        "memory",
        "params",
        "prometheus",
        "registry",
        "router",
        "selection",
        "server",
        "supervisor",
    },
}
# The wiring: `main` may import every part, `__main__` only `main`.
WIRING = {"main", "__main__"}
POLICY = {f"{D}.policies", f"{D}.backoff", f"{D}.enforcer", f"{D}.alerts", f"{D}.alerter"}
MECHANISM = [
    f"{D}.{m}"
    for m in (
        "process",
        "proctree",
        "memory",
        "monitor",
        "output",
        "oneshot",
        "health",
        "logs",
        "storage",
        "events",
        "history",
        "registry",
        "server",
        "hooks",
    )
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


@cache
def imported(name: str) -> frozenset[str]:
    """Every module `name` imports, resolved to its full name (`from . import x` counts as
    the module `x`, `from .a import b` as `a` and, if `a.b` is a module, `a.b` too)."""
    path = modules()[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    # Names imported from a module that are not modules themselves are not imports.
    known = modules()
    return frozenset(m for m in found if m in known or not m.startswith("engctl."))


def engctl_imports(name: str) -> set[str]:
    return {m for m in imported(name) if m == "engctl" or m.startswith("engctl.")}


def under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def test_the_module_list_is_read() -> None:
    assert len(modules()) > 60 and "engctl.daemon.router" in modules()
    # a relative import is resolved: `from .dispatch import Dispatcher` in the router
    assert f"{D}.dispatch" in imported(f"{D}.router")


@pytest.mark.parametrize(
    "name",
    sorted(
        m
        for m in modules()
        if not under(m, "engctl.daemon") and m != "engctl"  # the package: lazy `Client` only
    ),
)
def test_no_module_outside_the_daemon_imports_it(name: str) -> None:
    """The CLI, the renderers, the client, the report, the engine helper and the shared
    contract never import `engctl.daemon`, absolutely or relatively, at any depth."""
    daemon = {m for m in imported(name) if under(m, "engctl.daemon")}
    assert not daemon, f"{name} imports {sorted(daemon)}"


@pytest.mark.parametrize("name", sorted(SHARED))
def test_the_shared_contract_imports_only_the_stdlib(name: str) -> None:
    """The shared contract imports the stdlib and itself only (no psutil, rich or typer, and
    nothing of the CLI or the daemon)."""
    assert name in modules()
    for module in imported(name):
        if module == "engctl":
            continue  # `from engctl import trust`: the submodule is what is imported
        if module.startswith("engctl."):
            assert module in SHARED, f"{name} imports {module}"
        else:
            top = module.partition(".")[0]
            assert top in sys.stdlib_module_names | OUTSIDE_STDLIB, f"{name}: {module}"


def test_the_engine_helper_imports_only_the_stdlib() -> None:
    """`engctl.worker` runs inside engines: nothing of engctl but `engctl.finite` (which
    imports the stdlib only), nothing outside the stdlib but orjson and msgspec (used when the
    engine's Python has them)."""
    for module in imported("engctl.worker"):
        if module in ("engctl", "engctl.finite"):
            continue
        top = module.partition(".")[0]
        assert top in sys.stdlib_module_names or top in ("__future__", "orjson", "msgspec"), module
    assert all(m.partition(".")[0] in sys.stdlib_module_names | {"__future__"}
               for m in imported("engctl.finite"))


@pytest.mark.parametrize("name", sorted(m for m in modules() if under(m, "engctl.render")))
def test_render_reads_documents_not_the_client_or_typer(name: str) -> None:
    for module in imported(name):
        assert not under(module, "engctl.client") and not under(module, "typer"), module
        assert not under(module, "engctl.cli"), module


def test_every_daemon_module_has_its_allowed_imports_written_down() -> None:
    daemon = {m.removeprefix(D + ".") for m in modules() if under(m, D) and m != D}
    outside_selection = {
        m
        for m in daemon
        if not under(f"{D}.{m}", f"{D}.selection") and not under(f"{D}.{m}", f"{D}.admission")
    }
    assert outside_selection - WIRING == set(MAY_IMPORT), "update MAY_IMPORT and the header"


@pytest.mark.parametrize("short", sorted(MAY_IMPORT))
def test_daemon_modules_import_only_what_their_header_allows(short: str) -> None:
    allowed = {f"{D}.{m}" for m in MAY_IMPORT[short]}
    allowed |= SELECTION if f"{D}.selection" in allowed else set()
    allowed |= ADMISSION if f"{D}.admission" in allowed else set()
    name = f"{D}.{short}"
    daemon = {m for m in engctl_imports(name) if under(m, D) and m != D}
    assert daemon <= allowed, f"{name} imports {sorted(daemon - allowed)}"


@pytest.mark.parametrize("name", sorted(SELECTION))
def test_selection_imports_nothing_of_the_rest_of_the_daemon(name: str) -> None:
    """Selection is pure: its package, the shared contract and the stdlib."""
    for module in engctl_imports(name):
        assert module in SHARED or module in SELECTION, f"{name} imports {module}"


@pytest.mark.parametrize("name", sorted(ADMISSION))
def test_admission_imports_nothing_of_the_rest_of_the_daemon(name: str) -> None:
    """Admission control is pure (issue 15): its package, the shared contract, the stdlib."""
    for module in engctl_imports(name):
        assert module in SHARED or module in ADMISSION, f"{name} imports {module}"


@pytest.mark.parametrize("name", MECHANISM)
def test_mechanism_imports_no_policy(name: str) -> None:
    """What spawns, signals, reads pipes and writes files knows no failure policy."""
    assert not (engctl_imports(name) & POLICY), name


def _private_slots() -> set[str]:
    from engctl.daemon.selection import Candidate, CandidateSet

    return {s for cls in (Candidate, CandidateSet) for s in cls.__slots__ if s.startswith("_")}


@pytest.mark.parametrize("name", sorted(m for m in modules() if not under(m, f"{D}.selection")))
def test_no_module_outside_selection_touches_its_private_slots(name: str) -> None:
    """The selection package's privacy rule: `Candidate._in_flight` and the like are read
    and written inside the package only (outside: the public properties)."""
    private = _private_slots()
    tree = ast.parse(modules()[name].read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in private
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            pytest.fail(f"{name}:{node.lineno} reads {node.attr}, private to selection")


@pytest.mark.parametrize("name", sorted(modules()))
def test_long_modules_say_why_they_are_one_piece(name: str) -> None:
    """No module above ~600 lines unless its header says why it must be one piece."""
    path = modules()[name]
    if len(path.read_text().splitlines()) <= 620:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "one piece" in doc.lower(), f"{name}: over 600 lines and its header says not why"


@pytest.mark.parametrize(
    "name",
    sorted(
        m
        for m in modules()
        if not (under(m, "engctl.cli") or under(m, "engctl.render") or under(m, "engctl.examples"))
        or m in ("engctl.cli", "engctl.render", "engctl.examples")
    ),
)
def test_each_header_says_what_its_module_may_import(name: str) -> None:
    """Every module's header names its job and its import rule (for the modules of `cli`,
    `render` and `examples`, their package's header states the one rule of them all)."""
    doc = ast.get_docstring(ast.parse(modules()[name].read_text())) or ""
    assert doc, f"{name} has no header"
    assert "import" in doc.lower() or "stdlib" in doc.lower(), f"{name}: no import rule"
