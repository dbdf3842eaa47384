"""Unit tests of the failure-policy settings: `[daemon.policy]` and `[engines.NAME.policy]`
validation (every error names its key path), the default < daemon < engine merge with its
sources, and the round trips through EngineSpec and the daemon's config file."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from engctl.config import DaemonConfig, parse_toml
from engctl.errors import SpecError
from engctl.models import EngineSpec, parse_engines_document
from engctl.policy_config import (
    SECTIONS,
    TOP,
    FailingPolicy,
    PolicySpec,
    effective_policy,
    overrides_to_toml,
    parse_policy_table,
)

MIB = 1024 * 1024
WHERE = "engines.web.policy"


def rejects(table: Any, where: str = WHERE) -> str:
    """The message of the SpecError that parsing `table` raises."""
    with pytest.raises(SpecError) as info:
        parse_policy_table(table, where)
    return info.value.message


# --- parsing: what is accepted --------------------------------------------------------------


def test_parse_returns_only_the_keys_set_with_the_default_types() -> None:
    """Integers given for float settings become floats; integer settings stay integers; an
    empty section is left out, so "not set" stays distinguishable from "set to the default"."""
    out = parse_policy_table(
        {
            "max_isolated_percent": 30,
            "failing": {"window": 10, "consecutive_errors": 3},
            "cpu": {"action": "restart"},
            "slow": {"enabled": False, "threshold": 2.5},
            "hang": {},
        },
        WHERE,
    )
    assert out == {
        TOP: {"max_isolated_percent": 30.0},
        "failing": {"window": 10.0, "consecutive_errors": 3},
        "cpu": {"action": "restart"},
        "slow": {"enabled": False, "threshold": 2.5},
    }
    assert type(out[TOP]["max_isolated_percent"]) is float
    assert type(out["failing"]["window"]) is float
    assert type(out["failing"]["consecutive_errors"]) is int


def test_parse_empty_table_sets_nothing() -> None:
    assert parse_policy_table({}, WHERE) == {}


def test_parse_accepts_every_default_value() -> None:
    """The defaults themselves are valid settings (no range excludes its own default)."""
    table = PolicySpec().to_json()
    out = parse_policy_table(table, WHERE)
    assert effective_policy({}, out)[0] == PolicySpec()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2MiB", 2 * MIB),
        ("1.5 MB", 1_500_000),
        ("512KiB", 512 * 1024),
        ("off", 0),
        (" OFF ", 0),
        ("0", 0),
        (0, 0),
        (3 * MIB, 3 * MIB),
    ],
)
def test_leak_rate_is_a_size_per_second_or_off(value: Any, expected: int) -> None:
    """leak_rate is spelled like limits.max_rss; "off" and 0 turn leak detection off."""
    assert parse_policy_table({"memory": {"leak_rate": value}}, WHERE) == {
        "memory": {"leak_rate": expected}
    }


def test_range_bounds_are_inclusive_unless_open() -> None:
    """max_isolated_percent may be 0 or 100; slow.floor and downweight may be 1 (their low
    end, 0, is open)."""
    out = parse_policy_table(
        {"max_isolated_percent": 0, "slow": {"floor": 1.0, "downweight": 1}}, WHERE
    )
    assert out == {TOP: {"max_isolated_percent": 0.0}, "slow": {"floor": 1.0, "downweight": 1.0}}
    assert parse_policy_table({"max_isolated_percent": 100}, WHERE)[TOP] == {
        "max_isolated_percent": 100.0
    }


# --- parsing: errors name the exact key path ------------------------------------------------

SECTION_NAMES = "max_isolated_percent, crash, hang, memory, cpu, slow, failing"
FAILING_KEYS = (
    "consecutive_errors, error_rate, isolation_base, isolation_max, min_requests, slow_start,"
    " window"
)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        # unknown section, unknown key: named, with what would have been valid
        (
            {"failure": {"window": 3}},
            f"{WHERE}.failure: unknown key 'failure' (expected {SECTION_NAMES})",
        ),
        (
            {"failing": {"windows": 3}},
            f"{WHERE}.failing.windows: unknown key 'windows' (expected {FAILING_KEYS})",
        ),
        (
            {"max_isolated": 3},
            f"{WHERE}.max_isolated: unknown key 'max_isolated' (expected {SECTION_NAMES})",
        ),
        # a section that is not a table
        ({"failing": 3}, f"{WHERE}.failing: expected a table, got 3"),
        # wrong types
        ({"failing": {"window": "30s"}}, f"{WHERE}.failing.window: expected a number, got '30s'"),
        ({"slow": {"enabled": "yes"}}, f"{WHERE}.slow.enabled: expected true or false, got 'yes'"),
        ({"hang": {"enabled": 1}}, f"{WHERE}.hang.enabled: expected true or false, got 1"),
        (
            {"cpu": {"action": "reboot"}},
            f"{WHERE}.cpu.action: expected one of alert, restart, got 'reboot'",
        ),
        ({"cpu": {"action": 1}}, f"{WHERE}.cpu.action: expected one of alert, restart, got 1"),
        (
            {"max_isolated_percent": [50]},
            f"{WHERE}.max_isolated_percent: expected a number, got [50]",
        ),
        # bool where a number is expected (bool is an int in Python, not in TOML)
        ({"failing": {"window": True}}, f"{WHERE}.failing.window: expected a number, got True"),
        (
            {"failing": {"consecutive_errors": False}},
            f"{WHERE}.failing.consecutive_errors: expected a number, got False",
        ),
        # float where an integer is expected, even a whole one
        (
            {"failing": {"consecutive_errors": 2.5}},
            f"{WHERE}.failing.consecutive_errors: expected an integer, got 2.5",
        ),
        (
            {"slow": {"min_requests": 20.0}},
            f"{WHERE}.slow.min_requests: expected an integer, got 20.0",
        ),
        (
            {"crash": {"flap_max_restarts": 1.5}},
            f"{WHERE}.crash.flap_max_restarts: expected an integer, got 1.5",
        ),
        # not finite
        (
            {"failing": {"window": float("inf")}},
            f"{WHERE}.failing.window: expected a number, got inf",
        ),
        (
            {"crash": {"cooldown": float("nan")}},
            f"{WHERE}.crash.cooldown: expected a number, got nan",
        ),
        # out of range: closed and open low ends, high ends
        (
            {"max_isolated_percent": 150},
            f"{WHERE}.max_isolated_percent: must be at least 0 and at most 100, got 150",
        ),
        (
            {"failing": {"error_rate": 0}},
            f"{WHERE}.failing.error_rate: must be above 0 and at most 1, got 0",
        ),
        (
            {"failing": {"error_rate": 1.5}},
            f"{WHERE}.failing.error_rate: must be above 0 and at most 1, got 1.5",
        ),
        (
            {"slow": {"threshold": 1}},
            f"{WHERE}.slow.threshold: must be above 1 and at most 1000, got 1",
        ),
        (
            {"crash": {"cooldown": -1}},
            f"{WHERE}.crash.cooldown: must be at least 0 and at most 86400, got -1",
        ),
        (
            {"crash": {"flap_window": 0}},
            f"{WHERE}.crash.flap_window: must be above 0 and at most 86400, got 0",
        ),
        (
            {"memory": {"leak_window": 0.0}},
            f"{WHERE}.memory.leak_window: must be above 0 and at most 86400, got 0",
        ),
        # leak_rate: a size or off; no negative rates, no fractional bytes
        (
            {"memory": {"leak_rate": "fast"}},
            f"{WHERE}.memory.leak_rate: expected a size such as 512MiB or 1GB, got 'fast'",
        ),
        (
            {"memory": {"leak_rate": "-2MiB"}},
            f"{WHERE}.memory.leak_rate: expected a size such as 512MiB or 1GB, got '-2MiB'",
        ),
        ({"memory": {"leak_rate": True}}, f"{WHERE}.memory.leak_rate: expected a number, got True"),
        ({"memory": {"leak_rate": 1.5}}, f"{WHERE}.memory.leak_rate: expected an integer, got 1.5"),
    ],
)
def test_parse_errors_name_the_exact_key_path(table: dict[str, Any], message: str) -> None:
    assert rejects(table) == message


def test_parse_error_ranges_start_with_the_key_path() -> None:
    """Integer ranges too (the exact spelling of the upper bound is not the point here)."""
    assert rejects({"crash": {"flap_max_restarts": 0}}).startswith(
        f"{WHERE}.crash.flap_max_restarts: must be at least 1 and at most "
    )
    assert rejects({"memory": {"leak_rate": -1}}).startswith(
        f"{WHERE}.memory.leak_rate: must be at least 0 and at most "
    )


@pytest.mark.parametrize("table", [[], 5, "failing", None])
def test_parse_a_policy_that_is_not_a_table_is_rejected(table: Any) -> None:
    assert rejects(table) == f"{WHERE}: expected a table such as [{WHERE}.failing]"


def test_every_numeric_setting_has_a_range() -> None:
    """A setting without an entry in the range table would fail with a KeyError instead of a
    SpecError: parse each numeric default once to prove every one is covered."""
    spec = PolicySpec()
    for name in SECTIONS:
        for f in fields(getattr(spec, name)):
            value = getattr(getattr(spec, name), f.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                assert parse_policy_table({name: {f.name: value}}, WHERE) == {name: {f.name: value}}


# --- merge: default < daemon < engine -------------------------------------------------------


def test_effective_policy_without_overrides_is_the_default_from_default() -> None:
    spec, sources = effective_policy({}, {})
    assert spec == PolicySpec()
    assert set(sources) == {TOP, *SECTIONS}
    assert all(origin == "default" for section in sources.values() for origin in section.values())
    assert set(sources["failing"]) == {f.name for f in fields(FailingPolicy)}


def test_effective_policy_engine_beats_daemon_beats_default_key_by_key() -> None:
    """Layers merge per key, not per section: an engine that sets failing.window keeps the
    daemon's failing.consecutive_errors."""
    daemon = parse_policy_table(
        {
            "max_isolated_percent": 40,
            "failing": {"window": 60, "consecutive_errors": 3},
            "slow": {"threshold": 4},
        },
        "daemon.policy",
    )
    engine = parse_policy_table(
        {"max_isolated_percent": 25, "failing": {"window": 10}, "cpu": {"action": "restart"}},
        WHERE,
    )
    spec, sources = effective_policy(daemon, engine)
    assert spec.max_isolated_percent == 25.0
    assert spec.failing.window == 10.0
    assert spec.failing.consecutive_errors == 3
    assert spec.failing.error_rate == FailingPolicy().error_rate
    assert spec.slow.threshold == 4.0
    assert spec.cpu.action == "restart"
    assert sources[TOP] == {"max_isolated_percent": "engine"}
    assert sources["failing"]["window"] == "engine"
    assert sources["failing"]["consecutive_errors"] == "daemon"
    assert sources["failing"]["error_rate"] == "default"
    assert sources["slow"]["threshold"] == "daemon"
    assert sources["cpu"]["action"] == "engine"
    assert sources["memory"] == dict.fromkeys(
        ("leak_window", "leak_rate", "drain_timeout", "action"), "default"
    )


def test_effective_policy_daemon_alone_applies_to_an_engine_without_settings() -> None:
    daemon = parse_policy_table({"memory": {"leak_rate": "off"}}, "daemon.policy")
    spec, sources = effective_policy(daemon, {})
    assert spec.memory.leak_rate == 0
    assert sources["memory"]["leak_rate"] == "daemon"


def test_effective_policy_isolation_max_is_never_below_isolation_base() -> None:
    """A base above the cap (each valid alone) would make every isolation the cap: the cap
    is raised to the base instead."""
    engine = parse_policy_table({"failing": {"isolation_base": 600, "isolation_max": 60}}, WHERE)
    spec, _ = effective_policy({}, engine)
    assert spec.failing.isolation_base == spec.failing.isolation_max == 600.0


def test_overrides_to_toml_is_the_table_parse_accepts() -> None:
    """The export form puts top-level keys back at the top; parsing it gives the same."""
    overrides = parse_policy_table(
        {"max_isolated_percent": 20, "crash": {"cooldown": 120}, "memory": {"leak_rate": "1MiB"}},
        WHERE,
    )
    table = overrides_to_toml(overrides)
    assert table == {
        "max_isolated_percent": 20.0,
        "crash": {"cooldown": 120.0},
        "memory": {"leak_rate": MIB},
    }
    assert parse_policy_table(table, WHERE) == overrides


# --- EngineSpec carries `policy` ------------------------------------------------------------


def test_engine_spec_round_trip_keeps_policy() -> None:
    spec = EngineSpec.from_dict(
        "web",
        {
            "command": ["python3", "w.py"],
            "policy": {
                "max_isolated_percent": 25,
                "failing": {"window": 10, "consecutive_errors": 2},
                "memory": {"leak_rate": "2MiB"},
                "slow": {"enabled": False},
            },
        },
    )
    assert spec.policy == {
        TOP: {"max_isolated_percent": 25.0},
        "failing": {"window": 10.0, "consecutive_errors": 2},
        "memory": {"leak_rate": 2 * MIB},
        "slow": {"enabled": False},
    }
    out = spec.to_dict()
    assert out["policy"] == {
        "max_isolated_percent": 25.0,
        "failing": {"window": 10.0, "consecutive_errors": 2},
        "memory": {"leak_rate": 2 * MIB},
        "slow": {"enabled": False},
    }
    assert EngineSpec.from_dict("web", out) == spec


def test_engine_spec_without_policy_exports_none() -> None:
    spec = EngineSpec.from_dict("web", {"command": ["true"]})
    assert spec.policy == {}
    assert "policy" not in spec.to_dict()
    assert EngineSpec.from_dict("web", spec.to_dict()) == spec


def test_engine_spec_policy_change_is_applied_in_place() -> None:
    """New policy settings need no new processes."""
    a = EngineSpec.from_dict("web", {"command": ["true"]})
    b = EngineSpec.from_dict("web", {"command": ["true"], "policy": {"hang": {"enabled": False}}})
    assert b.changed_fields(a) == {"policy"}
    assert not b.needs_restart(a)


def test_engine_spec_from_toml_reads_policy_sub_tables() -> None:
    doc = parse_toml(
        '[engines.web]\ncommand = ["true"]\n'
        "[engines.web.policy]\nmax_isolated_percent = 30\n"
        "[engines.web.policy.failing]\nerror_rate = 0.25\n",
        "engines.toml",
    )
    (spec,) = parse_engines_document(doc)
    assert spec.policy == {TOP: {"max_isolated_percent": 30.0}, "failing": {"error_rate": 0.25}}


def test_engine_spec_policy_error_names_the_engine_and_key() -> None:
    with pytest.raises(SpecError) as info:
        EngineSpec.from_dict("web", {"command": ["true"], "policy": {"slow": {"threshold": 0.5}}})
    assert info.value.message == (
        "engines.web.policy.slow.threshold: must be above 1 and at most 1000, got 0.5"
    )


# --- DaemonConfig reads [daemon.policy] -----------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "config.toml"
    f.write_text(text)
    return f


def test_daemon_config_reads_daemon_policy(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "[daemon]\npolicy_interval = 0.5\n"
        "[daemon.policy]\nmax_isolated_percent = 30\n"
        "[daemon.policy.failing]\nconsecutive_errors = 3\nwindow = 60\n"
        '[daemon.policy.memory]\nleak_rate = "4MiB"\n'
        '[daemon.policy.cpu]\naction = "restart"\n',
    )
    cfg = DaemonConfig.load(f)
    assert cfg.policy_interval == 0.5
    assert cfg.policy == {
        TOP: {"max_isolated_percent": 30.0},
        "failing": {"consecutive_errors": 3, "window": 60.0},
        "memory": {"leak_rate": 4 * MIB},
        "cpu": {"action": "restart"},
    }
    # ...and those are the daemon layer under an engine's own settings.
    engine = parse_policy_table({"failing": {"window": 5}}, WHERE)
    spec, sources = effective_policy(cfg.policy, engine)
    assert (spec.failing.consecutive_errors, spec.failing.window) == (3, 5.0)
    assert (sources["failing"]["consecutive_errors"], sources["failing"]["window"]) == (
        "daemon",
        "engine",
    )


def test_daemon_config_without_policy_has_no_overrides(tmp_path: Path) -> None:
    cfg = DaemonConfig.load(write(tmp_path, "[daemon]\nmax_queue = 10\n"))
    assert cfg.policy == {}
    assert effective_policy(cfg.policy, {})[0] == PolicySpec()


@pytest.mark.parametrize(
    ("text", "key_path", "problem"),
    [
        (
            "[daemon.policy.failing]\nconsecutive_errors = 2.5\n",
            "daemon.policy.failing.consecutive_errors",
            "expected an integer, got 2.5",
        ),
        (
            "[daemon.policy.flap]\nwindow = 3\n",
            "daemon.policy.flap",
            "unknown key 'flap'",
        ),
        (
            "[daemon.policy.slow]\nfloor = 0\n",
            "daemon.policy.slow.floor",
            "must be above 0 and at most 1, got 0",
        ),
        (
            '[daemon.policy.memory]\nleak_rate = "a lot"\n',
            "daemon.policy.memory.leak_rate",
            "expected a size such as 512MiB or 1GB, got 'a lot'",
        ),
        ("[daemon]\npolicy = 5\n", "daemon.policy", "expected a table"),
    ],
)
def test_daemon_config_rejects_a_bad_policy_with_the_key_path(
    tmp_path: Path, text: str, key_path: str, problem: str
) -> None:
    f = write(tmp_path, text)
    with pytest.raises(SpecError) as info:
        DaemonConfig.load(f)
    msg = info.value.message
    assert msg.startswith(f"{f}: {key_path}: ")
    assert problem in msg
