"""`[engines.NAME.scale]` and `[daemon.scale]` (issue 14): each bad value is one error naming
its field, and a valid table survives export and import."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engctl.config import DaemonConfig, ScaleSettings, config_table
from engctl.errors import SpecError
from engctl.models import EngineSpec, ScaleSpec


def spec(**keys: Any) -> EngineSpec:
    return EngineSpec.from_dict("pool", {"command": ["x"], **keys})


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"scale": {"min": 5, "max": 4}}, "engines.pool.scale.min: 5 is above scale.max 4"),
        (
            {"scale": {"min_idle": 9, "max": 8}},
            "engines.pool.scale.min_idle: 9 is above scale.max 8",
        ),
        ({"scale": {"target": 0}}, "engines.pool.scale.target: must be above 0 and at most 1"),
        ({"scale": {"target": 1.5}}, "engines.pool.scale.target: must be above 0 and at most 1"),
        ({"scale": {"idle_timeout": -1}}, "engines.pool.scale.idle_timeout: must be above 0"),
        ({"scale": {"max": 0}}, "engines.pool.scale.max: must be from 1 to 1000, got 0"),
        ({"scale": {"mx": 3}}, "engines.pool.scale.mx: unknown key 'mx'"),
        ({"scale": {"predict": "yes"}}, "engines.pool.scale.predict: expected true or false"),
        (
            {"mode": "service", "scale": {}},
            "engines.pool.scale: autoscaling applies to worker engines; a service takes no",
        ),
        (
            {"mode": "oneshot", "scale": {}},
            "engines.pool.scale: autoscaling applies to worker engines; a oneshot engine",
        ),
        (
            {"instances": 3, "scale": {}},
            "engines.pool.instances: not with [engines.pool.scale]: the autoscaler sets",
        ),
    ],
)
def test_a_bad_scale_table_is_one_error_naming_the_field(
    keys: dict[str, Any], message: str
) -> None:
    with pytest.raises(SpecError) as info:
        spec(**keys)
    assert info.value.message.startswith(message), info.value.message
    assert "\n" not in info.value.message


def test_a_scale_table_survives_export_and_import() -> None:
    original = spec(scale={"min": 0, "max": 8, "min_idle": 1, "target": 0.5, "predict": True})
    assert original.scale == ScaleSpec(min=0, max=8, min_idle=1, target=0.5, predict=True)
    again = EngineSpec.from_dict("pool", original.to_dict())
    assert again == original
    defaults = spec(scale={})
    assert defaults.to_dict()["scale"] == {}
    assert EngineSpec.from_dict("pool", defaults.to_dict()) == defaults


def test_the_floor_is_min_or_the_warm_pool() -> None:
    assert ScaleSpec(min=0, max=4, min_idle=0).floor == 0
    assert ScaleSpec(min=1, max=4, min_idle=3).floor == 3
    assert ScaleSpec(min=2, max=4, min_idle=1).floor == 2


def test_scale_min_above_max_is_refused() -> None:
    with pytest.raises(SpecError, match=r"scale.min: 9 is above scale.max 4 of engine 'pool'"):
        spec(scale={"max": 4}).with_scale_min(9)
    assert spec(scale={"max": 4}).with_scale_min(3).scale == ScaleSpec(min=3, max=4)


def test_daemon_scale_settings_and_the_lease_cap(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        '[daemon]\nmax_lease_ttl = 120\n[daemon.scale]\nmin_available_memory = "512MiB"\n'
        "interval = 0.5\n"
    )
    config = DaemonConfig.load(path)
    assert config.max_lease_ttl == 120.0
    assert config.scale == ScaleSettings(min_available_memory=512 * 1024 * 1024, interval=0.5)
    assert config_table(config)["scale"] == {"min_available_memory": 512 << 20, "interval": 0.5}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("min_available_memory = 'lots'", "daemon.scale.min_available_memory: expected a size"),
        ("interval = 0", "daemon.scale.interval: expected a positive number, got 0"),
        ("spare = 1", "daemon.scale.spare: unknown key 'spare'"),
    ],
)
def test_bad_daemon_scale_settings_name_the_field(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(f"[daemon.scale]\n{table}\n")
    with pytest.raises(SpecError, match=message):
        DaemonConfig.load(path)
