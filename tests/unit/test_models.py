"""Unit tests of engine specs: validation messages, defaults, export round trip, dependencies."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engctl.errors import SpecError
from engctl.models import (
    MAX_INSTANCES,
    BackoffSpec,
    EngineSpec,
    check_dependencies,
    format_size,
    parse_engines_document,
    parse_instance_ref,
    parse_signal,
    parse_size,
)
from engctl.states import EngineMode, RestartPolicy


def spec(name: str = "web", **data: Any) -> EngineSpec:
    """A spec built from a dict with a default command."""
    data.setdefault("command", ["python3", "app.py"])
    return EngineSpec.from_dict(name, data)


def spec_error(name: str = "web", **data: Any) -> str:
    """The message of the SpecError raised by validating `data`."""
    data.setdefault("command", ["python3", "app.py"])
    with pytest.raises(SpecError) as info:
        EngineSpec.from_dict(name, data)
    return info.value.message


# --- defaults and basic validation -----------------------------------------------------------


def test_minimal_spec_gets_documented_defaults() -> None:
    """A table with only a command gets every documented default."""
    s = spec()
    assert s.command == ("python3", "app.py")
    assert s.type == "generic"
    assert s.mode is EngineMode.WORKER
    assert s.instances == 1
    assert s.max_concurrency == 1
    assert s.weight == 1.0
    assert s.restart.policy is RestartPolicy.ON_FAILURE
    assert s.restart.backoff == BackoffSpec()
    assert s.stop.signal == "SIGTERM"
    assert s.stop.timeout == 10.0
    assert s.health.check == "ping"
    assert s.limits.max_rss is None
    assert s.limits.max_cpu_percent is None


def test_non_worker_modes_default_to_no_health_check() -> None:
    """Oneshot and service engines have no health check unless one is given."""
    assert spec(mode="oneshot").health.check is None
    assert spec(mode="service").health.check is None


def test_instances_out_of_range_names_the_field_path() -> None:
    """A negative instance count is rejected with the full field path and the range."""
    assert spec_error(instances=-1) == "engines.web.instances: must be from 0 to 1000, got -1"
    assert f"got {MAX_INSTANCES + 1}" in spec_error(instances=MAX_INSTANCES + 1)


@pytest.mark.parametrize(
    ("data", "path"),
    [
        ({"instances": "2"}, "engines.web.instances: expected an integer"),
        ({"instances": True}, "engines.web.instances: expected an integer"),
        ({"max_concurrency": 0}, "engines.web.max_concurrency: must be from 1 to 10000"),
        ({"weight": 0}, "engines.web.weight: must be above 0"),
        ({"weight": float("nan")}, "engines.web.weight: expected a number"),
        ({"weight": 1001}, "engines.web.weight: must be above 0 and at most 1000"),
        ({"mode": "daemon"}, "engines.web.mode: must be worker, oneshot or service"),
        ({"type": 3}, "engines.web.type: expected a string"),
        ({"shell": "yes"}, "engines.web.shell: expected true or false"),
        ({"cwd": ""}, "engines.web.cwd: expected a non-empty string"),
        ({"capabilities": ["fp32", ""]}, "engines.web.capabilities: expected a list"),
        ({"capabilities": "fp32"}, "engines.web.capabilities: expected a list"),
        ({"labels": ["a"]}, "engines.web.labels: expected a table of strings"),
        ({"env": {"A": True}}, "engines.web.env.A: expected a string"),
        ({"depends_on": ["web"]}, "engines.web.depends_on: an engine cannot depend on itself"),
        ({"restart": {"policy": "sometimes"}}, "engines.web.restart.policy: must be always"),
        ({"restart": {"max_retries": -1}}, "engines.web.restart.max_retries: must be from 0"),
        ({"restart": {"start_seconds": -1}}, "engines.web.restart.start_seconds: must be at"),
        ({"restart": {"backoff": {"factor": 0.5}}}, "engines.web.restart.backoff.factor: must"),
        ({"restart": "always"}, "engines.web.restart: expected a table, got str"),
        ({"restart": {"backoff": 1}}, "engines.web.restart.backoff: expected a table, got int"),
        ({"stop": {"signal": "SIGNOPE"}}, "engines.web.stop.signal: unknown signal 'SIGNOPE'"),
        ({"stop": {"timeout": "10"}}, "engines.web.stop.timeout: expected a number"),
        ({"health": {"check": "smoke"}}, "engines.web.health.check: expected ping, none"),
        ({"health": {"interval": 0}}, "engines.web.health.interval: must be above 0"),
        ({"health": {"failure_threshold": 0}}, "engines.web.health.failure_threshold: must"),
        ({"limits": {"max_rss": "lots"}}, "engines.web.limits.max_rss: expected a size"),
        ({"limits": {"max_cpu_percent": 0}}, "engines.web.limits.max_cpu_percent: must be"),
    ],
)
def test_every_error_names_its_field_path(data: dict[str, Any], path: str) -> None:
    """Each invalid value is rejected with a message that starts with its dotted field path."""
    assert spec_error(**data).startswith(path)


def test_ping_health_check_needs_worker_mode() -> None:
    """A ping health check on a service engine is rejected: only workers answer ping."""
    msg = spec_error(mode="service", health={"check": "ping"})
    assert msg.startswith("engines.web.health.check: ping needs mode")


@pytest.mark.parametrize(
    "check", ["ping", "none", "command:true", "http://localhost:8080/h", "tcp:localhost:80"]
)
def test_accepted_health_checks(check: str) -> None:
    """Every documented health check form validates; "none" disables the check."""
    s = spec(health={"check": check})
    assert s.health.check == (None if check == "none" else check)


@pytest.mark.parametrize(
    ("where", "data"),
    [
        ("engines.web.colour", {"colour": "red"}),
        ("engines.web.restart.retries", {"restart": {"retries": 3}}),
        ("engines.web.restart.backoff.jitter", {"restart": {"backoff": {"jitter": 0.1}}}),
        ("engines.web.stop.grace", {"stop": {"grace": 1}}),
        ("engines.web.health.port", {"health": {"port": 80}}),
        ("engines.web.limits.max_vms", {"limits": {"max_vms": "1GB"}}),
    ],
)
def test_unknown_keys_are_named_at_every_level(where: str, data: dict[str, Any]) -> None:
    """An unknown key at any nesting level is rejected with its full path and its name."""
    key = where.rsplit(".", 1)[1]
    assert spec_error(**data) == f"{where}: unknown key {key!r}"


@pytest.mark.parametrize("name", ["", "-web", ".web", "we b", "web#0", "a" * 64, "wéb"])
def test_bad_engine_names_are_rejected(name: str) -> None:
    """Names must start with a letter or digit and use only letters, digits, '.', '_', '-'."""
    msg = spec_error(name)
    assert "bad engine name" in msg
    assert repr(name) in msg


@pytest.mark.parametrize("name", ["web", "w", "0", "onnx-small", "a.b_c-d", "a" * 63])
def test_good_engine_names_are_accepted(name: str) -> None:
    """Names of 1 to 63 allowed characters validate."""
    assert spec(name).name == name


def test_missing_command_is_an_error() -> None:
    """A table without a command is rejected, naming the command field."""
    with pytest.raises(SpecError, match=r"^engines\.web\.command: missing"):
        EngineSpec.from_dict("web", {})


@pytest.mark.parametrize("command", [[], [""], ["  "], "", "   ", "''"])
def test_empty_command_is_an_error(command: Any) -> None:
    """An empty list, empty string or an argv with an empty program is rejected."""
    assert spec_error(command=command) == "engines.web.command: empty command"


@pytest.mark.parametrize("command", [3, ["a", 1], {"a": "b"}])
def test_command_of_the_wrong_type_is_an_error(command: Any) -> None:
    """A command that is neither a string nor a list of strings is rejected."""
    assert spec_error(command=command).startswith(
        "engines.web.command: expected a list of strings or a string"
    )


def test_command_string_is_shlex_split() -> None:
    """A command given as a string is split like a shell would, without running a shell."""
    s = spec(command="python3 -m app --name 'two words'")
    assert s.command == ("python3", "-m", "app", "--name", "two words")
    assert s.argv == ["python3", "-m", "app", "--name", "two words"]


def test_unbalanced_quotes_in_command_string_are_an_error() -> None:
    """A command string that cannot be split is rejected with the field path."""
    assert spec_error(command="echo 'oops").startswith("engines.web.command: cannot split")


def test_shell_command_is_kept_whole_and_run_by_sh() -> None:
    """With shell = true the command string is kept whole and run through /bin/sh -c."""
    s = spec(command="echo $HOME | tr a-z A-Z", shell=True)
    assert s.command == ("echo $HOME | tr a-z A-Z",)
    assert s.argv == ["/bin/sh", "-c", "echo $HOME | tr a-z A-Z"]


def test_non_string_env_and_label_values_become_strings() -> None:
    """Numbers in env and labels are accepted and stored as strings."""
    s = spec(env={"THREADS": 1, "RATIO": 0.5}, labels={"tier": "gold", "gen": 2})
    assert s.env == {"THREADS": "1", "RATIO": "0.5"}
    assert s.labels == {"tier": "gold", "gen": "2"}


def test_with_instances_scales_and_checks_the_range() -> None:
    """with_instances returns a scaled copy and rejects counts out of range."""
    s = spec()
    assert s.with_instances(3).instances == 3
    assert s.instances == 1
    with pytest.raises(SpecError, match="instances: must be from 0 to 1000, got -1"):
        s.with_instances(-1)


# --- sizes and signals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512MiB", 512 * 1024**2),
        ("1GB", 10**9),
        ("1gib", 1024**3),
        ("1.5 GB", 1_500_000_000),
        ("10k", 10_000),
        ("2KiB", 2048),
        ("100", 100),
        ("100b", 100),
        (" 7 MB ", 7_000_000),
        (4096, 4096),
    ],
)
def test_parse_size_accepts_ints_and_unit_strings(value: Any, expected: int) -> None:
    """Sizes are integers of bytes or numbers with a decimal or binary unit."""
    assert parse_size(value, "limits.max_rss") == expected


@pytest.mark.parametrize("value", ["", "MiB", "12 parsecs", "-1MiB", "1e3", "0", "0.0001b", 1.5])
def test_parse_size_rejects_bad_strings(value: Any) -> None:
    """A string that is not a positive number with a known unit is rejected with the field."""
    with pytest.raises(SpecError, match=r"^limits\.max_rss: expected a size such as 512MiB"):
        parse_size(value, "limits.max_rss")


@pytest.mark.parametrize("value", [0, -5])
def test_parse_size_rejects_non_positive_ints(value: int) -> None:
    """Zero or negative byte counts are rejected."""
    with pytest.raises(SpecError, match=r"^x: must be a positive size"):
        parse_size(value, "x")


def test_parse_size_rejects_booleans() -> None:
    """True is not the size 1."""
    with pytest.raises(SpecError, match="expected a size"):
        parse_size(True, "x")


def test_max_rss_is_parsed_through_parse_size() -> None:
    """limits.max_rss takes the size forms and stores bytes."""
    assert spec(limits={"max_rss": "512MiB"}).limits.max_rss == 512 * 1024**2
    assert spec(limits={"max_rss": 1000}).limits.max_rss == 1000


@pytest.mark.parametrize(
    ("n", "text"),
    [(512 * 1024**2, "512MiB"), (3 * 1024**3, "3GiB"), (2048, "2KiB"), (1000, "1000")],
)
def test_format_size_gives_shortest_exact_binary_spelling(n: int, text: str) -> None:
    """format_size picks the largest binary unit that divides the count, and parses back."""
    assert format_size(n) == text
    assert parse_size(text, "x") == n


@pytest.mark.parametrize(
    ("value", "expected"),
    [("SIGTERM", "SIGTERM"), ("term", "SIGTERM"), (" int ", "SIGINT"), (9, "SIGKILL")],
)
def test_parse_signal_canonicalises_names_and_numbers(value: Any, expected: str) -> None:
    """Signals are accepted by name with or without SIG, any case, or by number."""
    assert parse_signal(value, "stop.signal") == expected


@pytest.mark.parametrize("value", ["SIGNOPE", "", 0, 99999, True, 1.0, None])
def test_parse_signal_rejects_unknown_signals(value: Any) -> None:
    """Unknown names, numbers and other types are rejected with the field path."""
    with pytest.raises(SpecError, match=r"^stop\.signal: unknown signal"):
        parse_signal(value, "stop.signal")


def test_stop_signal_in_spec_is_canonical() -> None:
    """stop.signal = "hup" is stored as SIGHUP."""
    assert spec(stop={"signal": "hup"}).stop.signal == "SIGHUP"


# --- export round trip -----------------------------------------------------------------------


def test_to_dict_of_defaults_is_only_the_command() -> None:
    """A spec with every default exports only its command."""
    assert spec().to_dict() == {"command": ["python3", "app.py"]}


def test_to_dict_exports_changed_nested_fields() -> None:
    """Non-default nested values are exported, sizes in their binary spelling."""
    s = spec(
        mode="service",
        restart={"policy": "always", "backoff": {"max": 5}},
        stop={"signal": "INT"},
        health={"check": "tcp:localhost:80"},
        limits={"max_rss": 512 * 1024**2},
    )
    d = s.to_dict()
    assert d["mode"] == "service"
    assert d["restart"] == {"policy": "always", "backoff": {"max": 5.0}}
    assert d["stop"] == {"signal": "SIGINT"}
    assert d["health"] == {"check": "tcp:localhost:80"}
    assert d["limits"] == {"max_rss": "512MiB"}
    assert EngineSpec.from_dict("web", d) == s


def test_disabled_worker_health_check_survives_export() -> None:
    """A worker with health.check = "none" exports it, so re-import does not turn ping back on."""
    s = spec(health={"check": "none"})
    assert s.health.check is None
    assert EngineSpec.from_dict("web", s.to_dict()) == s


_names = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)
_words = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=8)
_small_floats = st.floats(min_value=0.01, max_value=100, allow_nan=False).map(lambda x: round(x, 3))


@st.composite
def spec_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """Valid engine tables with a few fields varied."""
    mode = draw(st.sampled_from(["worker", "oneshot", "service"]))
    data: dict[str, Any] = {"command": draw(st.lists(_words, min_size=1, max_size=4)), "mode": mode}
    if draw(st.booleans()):
        data["instances"] = draw(st.integers(0, MAX_INSTANCES))
    if draw(st.booleans()):
        data["weight"] = draw(_small_floats)
    if draw(st.booleans()):
        data["capabilities"] = draw(st.lists(_names, max_size=3))
    if draw(st.booleans()):
        data["labels"] = draw(st.dictionaries(_names, _names, max_size=3))
    if draw(st.booleans()):
        data["env"] = draw(st.dictionaries(_names.map(str.upper), _words, max_size=3))
    if draw(st.booleans()):
        data["cwd"] = "/" + draw(_names)
    if draw(st.booleans()):
        data["restart"] = {
            "policy": draw(st.sampled_from(["always", "on-failure", "never"])),
            "max_retries": draw(st.integers(0, 100)),
            "backoff": {
                "initial": draw(_small_floats),
                "factor": draw(st.sampled_from([1, 1.5, 2])),
            },
        }
    if draw(st.booleans()):
        data["stop"] = {
            "signal": draw(st.sampled_from(["TERM", "SIGINT", "hup", 9])),
            "timeout": draw(_small_floats),
        }
    checks = ["none", "command:true", "tcp:localhost:80"] + (["ping"] if mode == "worker" else [])
    if draw(st.booleans()):
        data["health"] = {
            "check": draw(st.sampled_from(checks)),
            "failure_threshold": draw(st.integers(1, 10)),
        }
    if draw(st.booleans()):
        data["limits"] = {
            "max_rss": draw(st.integers(1, 2**40)),
            "max_cpu_percent": draw(_small_floats),
        }
    return data


@settings(max_examples=150, deadline=None)
@given(name=_names, data=spec_dicts())
def test_to_dict_from_dict_round_trip(name: str, data: dict[str, Any]) -> None:
    """Exporting a valid spec and validating the export gives an equal spec."""
    s = EngineSpec.from_dict(name, data)
    exported = s.to_dict()
    assert EngineSpec.from_dict(name, exported) == s
    assert EngineSpec.from_dict(name, exported).to_dict() == exported


# --- changes ---------------------------------------------------------------------------------


def test_weight_change_needs_no_restart() -> None:
    """Changing only the weight is applied in place."""
    old, new = spec(weight=1.0), spec(weight=2.5)
    assert new.changed_fields(old) == {"weight"}
    assert not new.needs_restart(old)


@pytest.mark.parametrize(
    "change",
    [{"command": ["python3", "other.py"]}, {"env": {"A": "1"}}, {"cwd": "/srv"}, {"shell": True}],
)
def test_process_fields_need_a_restart(change: dict[str, Any]) -> None:
    """Changing the command, env, cwd or shell needs new processes."""
    old, new = spec(), spec(**change)
    assert new.changed_fields(old) == set(change)
    assert new.needs_restart(old)


def test_non_process_fields_need_no_restart() -> None:
    """Labels, capabilities, instances and limits change without a restart."""
    old = spec()
    new = spec(labels={"a": "b"}, capabilities=["x"], instances=3, limits={"max_rss": "1GB"})
    assert new.changed_fields(old) == {"labels", "capabilities", "instances", "limits"}
    assert not new.needs_restart(old)


def test_identical_specs_have_no_changes() -> None:
    """Two specs from the same table differ in nothing."""
    assert spec().changed_fields(spec()) == set()


# --- dependencies ----------------------------------------------------------------------------


def specs_with(deps: dict[str, list[str]]) -> dict[str, EngineSpec]:
    """Specs named by the keys of `deps`, each depending on its list."""
    return {n: EngineSpec(name=n, command=("true",), depends_on=tuple(d)) for n, d in deps.items()}


def test_check_dependencies_gives_topological_order() -> None:
    """Every engine comes after all of its dependencies."""
    deps = {"web": ["api", "cache"], "api": ["db"], "cache": [], "db": [], "lone": []}
    order = check_dependencies(specs_with(deps))
    assert sorted(order) == sorted(deps)
    for name, ds in deps.items():
        for d in ds:
            assert order.index(d) < order.index(name)


def test_unknown_dependency_is_named() -> None:
    """A dependency on an unregistered engine names the engine and the missing dependency."""
    with pytest.raises(SpecError) as info:
        check_dependencies(specs_with({"web": ["db"]}))
    assert info.value.message == "engines.web.depends_on: unknown engine 'db'"


def test_cycle_is_reported_as_its_path() -> None:
    """A two-engine cycle is reported as `a -> b -> a`."""
    with pytest.raises(SpecError) as info:
        check_dependencies(specs_with({"a": ["b"], "b": ["a"]}))
    assert "a -> b -> a" in info.value.message


def test_longer_cycle_path_excludes_the_acyclic_prefix() -> None:
    """The cycle path starts at the first engine on the cycle, not at the entry point."""
    with pytest.raises(SpecError) as info:
        check_dependencies(specs_with({"a": ["b"], "b": ["c"], "c": ["d"], "d": ["b"]}))
    assert info.value.message == "dependency cycle: b -> c -> d -> b"


def test_engines_document_parses_every_engine() -> None:
    """parse_engines_document validates each [engines.NAME] table."""
    doc = {"engines": {"a": {"command": ["true"]}, "b": {"command": "sleep 1"}}}
    specs = parse_engines_document(doc)
    assert [s.name for s in specs] == ["a", "b"]
    assert specs[1].command == ("sleep", "1")


def test_engines_document_rejects_unknown_top_level_keys() -> None:
    """A top-level key other than `engines` is rejected by name."""
    with pytest.raises(SpecError, match=r"^engine: unknown top-level key"):
        parse_engines_document({"engine": {"a": {"command": ["true"]}}})


def test_engines_document_rejects_non_table_engines() -> None:
    """`engines` must be a table of tables."""
    with pytest.raises(SpecError, match=r"^engines: expected tables"):
        parse_engines_document({"engines": ["a"]})


def test_engines_document_errors_name_the_engine() -> None:
    """An error inside one engine's table names that engine."""
    with pytest.raises(SpecError, match=r"^engines\.b\.instances:"):
        parse_engines_document(
            {"engines": {"a": {"command": ["true"]}, "b": {"command": ["x"], "instances": -3}}}
        )


# --- instance references and backoff ---------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "expected"), [("web", ("web", None)), ("web#0", ("web", 0)), ("a.b#12", ("a.b", 12))]
)
def test_parse_instance_ref(ref: str, expected: tuple[str, int | None]) -> None:
    """`name#k` splits into name and index; a bare name has no index."""
    assert parse_instance_ref(ref) == expected


@pytest.mark.parametrize("ref", ["web#", "web#x", "web#-1", "web#1.0", "web#²", "web#0#1"])
def test_parse_instance_ref_rejects_bad_indexes(ref: str) -> None:
    """An index that is not a plain decimal number is a SpecError, never a ValueError."""
    with pytest.raises(SpecError, match=re.escape(repr(ref))):
        parse_instance_ref(ref)
