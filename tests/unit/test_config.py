"""Unit tests of the daemon settings file, TOML errors and the engctl home folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from engctl.config import CapabilityWeights, DaemonConfig, parse_toml
from engctl.errors import SpecError
from engctl.paths import MAX_SOCKET_PATH, Paths, resolve_paths


def test_parse_toml_returns_the_document() -> None:
    """Valid TOML parses to nested dicts."""
    assert parse_toml('[engines.a]\ncommand = ["true"]\n', "x.toml") == {
        "engines": {"a": {"command": ["true"]}}
    }


def test_parse_toml_error_names_source_line_and_column() -> None:
    """A syntax error names the source file and the line and column where it is."""
    with pytest.raises(SpecError) as info:
        parse_toml('[engines.a]\ncommand = ["true"]\nweight = = 2\n', "engines.toml")
    msg = info.value.message
    assert msg.startswith("engines.toml: invalid TOML")
    assert "line 3" in msg
    assert "column" in msg


def test_parse_toml_error_at_end_of_document_has_a_position() -> None:
    """An error at the very end of the text still gives a line and a column."""
    with pytest.raises(SpecError) as info:
        parse_toml("[daemon]\nsample_interval = ", "c.toml")
    msg = info.value.message
    assert msg.startswith("c.toml: invalid TOML")
    assert "line 2" in msg
    assert "column" in msg


def test_parse_toml_error_is_chained_to_tomllib() -> None:
    """The SpecError keeps the tomllib error as its cause."""
    with pytest.raises(SpecError) as info:
        parse_toml("x", "s")
    assert info.value.__cause__ is not None


def test_load_missing_file_gives_defaults(tmp_path: Path) -> None:
    """Without a config file every setting has its default."""
    assert DaemonConfig.load(tmp_path / "none.toml") == DaemonConfig()


def test_load_file_without_daemon_section_gives_defaults(tmp_path: Path) -> None:
    """A config file without [daemon] gives the defaults."""
    f = tmp_path / "config.toml"
    f.write_text("# nothing here\n")
    assert DaemonConfig.load(f) == DaemonConfig()


def test_load_reads_daemon_settings(tmp_path: Path) -> None:
    """Keys under [daemon] override the defaults, with the field's type."""
    f = tmp_path / "config.toml"
    f.write_text("[daemon]\nsample_interval = 2\nlog_backups = 5\nshutdown_timeout = 1.5\n")
    cfg = DaemonConfig.load(f)
    assert cfg.sample_interval == 2.0
    assert isinstance(cfg.sample_interval, float)
    assert cfg.log_backups == 5
    assert cfg.shutdown_timeout == 1.5
    assert cfg.log_max_bytes == DaemonConfig().log_max_bytes


def test_load_rejects_unknown_keys(tmp_path: Path) -> None:
    """An unknown key under [daemon] is named with the file."""
    f = tmp_path / "config.toml"
    f.write_text("[daemon]\nsample_intervall = 2\n")
    with pytest.raises(SpecError) as info:
        DaemonConfig.load(f)
    assert info.value.message == f"{f}: daemon.sample_intervall: unknown key 'sample_intervall'"


@pytest.mark.parametrize("value", ["0", "-1", "-0.5", '"1"', "true"])
def test_load_rejects_non_positive_or_non_numeric_values(tmp_path: Path, value: str) -> None:
    """Every setting must be a positive number."""
    f = tmp_path / "config.toml"
    f.write_text(f"[daemon]\nsample_interval = {value}\n")
    with pytest.raises(SpecError, match=r"daemon\.sample_interval: expected a positive"):
        DaemonConfig.load(f)


@pytest.mark.parametrize("value", ["0.5", "1.5"])
def test_load_rejects_fractions_for_integer_settings(tmp_path: Path, value: str) -> None:
    """An integer setting given a fraction is rejected rather than silently truncated."""
    f = tmp_path / "config.toml"
    f.write_text(f"[daemon]\nlog_backups = {value}\n")
    with pytest.raises(SpecError, match=r"daemon\.log_backups: expected a positive integer"):
        DaemonConfig.load(f)


def test_load_rejects_non_table_daemon_section(tmp_path: Path) -> None:
    """`daemon = 3` is not a [daemon] table."""
    f = tmp_path / "config.toml"
    f.write_text("daemon = 3\n")
    with pytest.raises(SpecError, match=r"\[daemon\] must be a table"):
        DaemonConfig.load(f)


def test_load_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A broken config file is reported with its path and position."""
    f = tmp_path / "config.toml"
    f.write_text("[daemon\n")
    with pytest.raises(SpecError, match=rf"^{f}: invalid TOML.*line 1"):
        DaemonConfig.load(f)


def test_load_unreadable_path_is_a_spec_error(tmp_path: Path) -> None:
    """A config path that cannot be read (a folder) gives a SpecError naming it."""
    with pytest.raises(SpecError, match=rf"^{tmp_path}: cannot read"):
        DaemonConfig.load(tmp_path)


def test_resolve_paths_with_explicit_home(tmp_path: Path) -> None:
    """An explicit home puts run, state, logs and config under it."""
    p = resolve_paths(tmp_path)
    assert p == Paths(
        tmp_path / "run", tmp_path / "state", tmp_path / "logs", tmp_path / "config.toml"
    )
    assert p.socket == tmp_path / "run" / "engctl.sock"
    assert p.registry == tmp_path / "state" / "registry.json"
    assert p.instance_log("web", 2) == tmp_path / "logs" / "web.2.log"


def test_explicit_home_wins_over_engctl_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit home is used even when ENGCTL_HOME is set."""
    monkeypatch.setenv("ENGCTL_HOME", str(tmp_path / "other"))
    assert resolve_paths(tmp_path / "mine").state_dir == tmp_path / "mine" / "state"


def test_resolve_paths_from_engctl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit home, ENGCTL_HOME decides."""
    monkeypatch.setenv("ENGCTL_HOME", str(tmp_path))
    p = resolve_paths()
    assert p.runtime_dir == tmp_path / "run"
    assert p.config_file == tmp_path / "config.toml"


def test_relative_engctl_home_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative ENGCTL_HOME is made absolute against the current folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENGCTL_HOME", "rel")
    assert resolve_paths().state_dir == tmp_path / "rel" / "state"


def test_resolve_paths_without_home_uses_user_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without any home the platform's per-user folders are used, named for engctl."""
    monkeypatch.delenv("ENGCTL_HOME", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    p = resolve_paths()
    for d in (p.runtime_dir, p.state_dir, p.log_dir, p.config_file.parent):
        assert d.is_absolute()
        assert "engctl" in d.parts
    assert p.runtime_dir == tmp_path / "engctl"


def test_daemon_id_differs_between_homes(tmp_path: Path) -> None:
    """Two homes mark their engines with different ids; one home always with the same."""
    a, b = resolve_paths(tmp_path / "a"), resolve_paths(tmp_path / "b")
    assert a.daemon_id != b.daemon_id
    assert a.daemon_id == resolve_paths(tmp_path / "a").daemon_id


def test_short_home_gives_a_socket_path_within_the_limit() -> None:
    """A short temporary home keeps the socket path under the AF_UNIX limit."""
    assert len(str(resolve_paths("/tmp/ehXXXXXXXX").socket)) <= MAX_SOCKET_PATH


def test_capability_weights_table_overrides_some_factors(tmp_path: Path) -> None:
    """[daemon.capability_weights] sets the scored strategy's factors; the rest keep defaults."""
    f = tmp_path / "config.toml"
    f.write_text("[daemon.capability_weights]\nload = 0.5\naffinity = 0\n")
    assert DaemonConfig.load(f).capability_weights == CapabilityWeights(
        type=0.40, capability=0.25, load=0.5, performance=0.10, affinity=0.0
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("speed = 1", "unknown factor"),
        ("load = -1", "0 or more"),
        ('load = "high"', "0 or more"),
        ("type = 0\ncapability = 0\nload = 0\nperformance = 0\naffinity = 0", "at least one"),
    ],
)
def test_capability_weights_are_checked(tmp_path: Path, body: str, message: str) -> None:
    """A bad factor name or weight is refused with the key it concerns."""
    f = tmp_path / "config.toml"
    f.write_text(f"[daemon.capability_weights]\n{body}\n")
    with pytest.raises(SpecError, match=message):
        DaemonConfig.load(f)


def test_connection_settings_have_defaults_and_are_read(tmp_path: Path) -> None:
    """max_connections and idle_timeout default to 1024 and 300 s and come from [daemon]."""
    assert (DaemonConfig().max_connections, DaemonConfig().idle_timeout) == (1024, 300.0)
    path = tmp_path / "config.toml"
    path.write_text("[daemon]\nmax_connections = 64\nidle_timeout = 2.5\n")
    config = DaemonConfig.load(path)
    assert (config.max_connections, config.idle_timeout) == (64, 2.5)
    path.write_text("[daemon]\nmax_connections = 0\n")
    with pytest.raises(SpecError, match="max_connections: expected a positive number"):
        DaemonConfig.load(path)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[daemon]\nsample_interval = 1.0 # caf\xe9\n",
         "not UTF-8 text: byte 0xe9 at line 2, column 28"),
        (b"[daemon]\nx = " + b"[" * 5000, "nested too deeply"),
    ],
)  # fmt: skip
def test_unreadable_config_is_a_spec_error_naming_the_place(
    tmp_path: Path, data: bytes, message: str
) -> None:
    """A config.toml that is not UTF-8, or nests too deeply for the parser, is one SpecError
    naming the file (and the line), not a traceback (issue 9.12)."""
    path = tmp_path / "config.toml"
    path.write_bytes(data)
    with pytest.raises(SpecError, match=message):
        DaemonConfig.load(path)


def test_connection_cap_keeps_half_the_fds_for_engines() -> None:
    """The daemon serves max_connections, or half its fd limit if that is lower."""
    from engctl.daemon.server import connection_cap

    assert connection_cap(1024, 1 << 20) == 1024
    assert connection_cap(1024, 1024) == 512
    assert connection_cap(1024, 1) == 1
