"""The daemon's settings (`[daemon]` in `config.toml`) and the TOML reader with precise errors.

Shared contract between CLI and daemon: stdlib only. Where the files are is `engctl.paths`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engctl import trust
from engctl.admission_config import DaemonLimits, parse_daemon_limits
from engctl.alerting import AlertRule, HookSpec, parse_alerts, parse_hooks
from engctl.errors import SpecError
from engctl.policy_config import PolicyOverrides, overrides_to_toml, parse_policy_table
from engctl.protocol import STRATEGIES, StrategyName

# Settings `engctl daemon reload` cannot change in a running daemon: the socket's frame
# limit, and whether histograms, history and the /metrics port exist at all. The others
# apply at once (policies, dispatch defaults, sampling, log sizes, retention).
RESTART_SETTINGS = frozenset({"max_frame_bytes", "metrics", "metrics_port"})


@dataclass(frozen=True, slots=True)
class CapabilityWeights:
    """The weights of the capability strategy's factors (docs/configuration.md); its fields
    are the one list of the factors, by name (`[daemon.capability_weights]`, `--explain`)."""

    type: float = 0.40
    capability: float = 0.25
    load: float = 0.20
    performance: float = 0.10
    affinity: float = 0.05

    def __post_init__(self) -> None:
        for name in CAPABILITY_FACTORS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"capability weight {name} must be a number, not {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"capability weight {name} must be a finite number >= 0, not {value!r}"
                )
            object.__setattr__(self, name, float(value))


# The factors of the capability score, in the order `--explain` lists them.
CAPABILITY_FACTORS: tuple[str, ...] = tuple(f.name for f in fields(CapabilityWeights))


@dataclass(frozen=True, slots=True)
class ScaleSettings:
    """`[daemon.scale]`: the autoscaler's daemon-wide settings (docs/elastic.md)."""

    # Host memory below this many bytes available: idle instances of autoscaled engines are
    # reclaimed, largest RSS first, down to their `min` (0: off).
    min_available_memory: int = 0
    # Seconds between two looks at idle time, prewarm ends, predictions and memory (scaling
    # up for requests that wait does not wait for it).
    interval: float = 1.0


@dataclass(frozen=True)
class DaemonConfig:
    """Daemon settings; every key is optional in `config.toml` under `[daemon]`."""

    sample_interval: float = 1.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3
    events_retention: int = 100_000
    max_frame_bytes: int = 1024 * 1024
    # Client connections served at once (at most half the open-file limit); more are refused.
    max_connections: int = 1024
    # Seconds after which a connection with no call in flight and no stream followed closes.
    idle_timeout: float = 300.0
    shutdown_timeout: float = 30.0
    default_strategy: StrategyName = StrategyName.LEAST_LOADED
    default_timeout: float = 30.0
    max_queue: int = 1000
    # The capability strategy's factor weights ([daemon.capability_weights]).
    capability_weights: CapabilityWeights = CapabilityWeights()
    # How often failure policies look at their observations (seconds).
    policy_interval: float = 1.0
    # Latency histograms and the history database (report, metrics, top); off saves the
    # few hundred nanoseconds per request and the disk.
    metrics: bool = True
    # Serve Prometheus /metrics on 127.0.0.1:PORT (0: off).
    metrics_port: int = 0
    history_retention: float = 7 * 86400.0  # seconds of 5-minute buckets kept
    history_fine_retention: float = 3600.0  # seconds of 10-second buckets kept
    history_max_mb: int = 256
    # Failure-policy defaults for every engine ([daemon.policy]); engines override them.
    policy: PolicyOverrides = field(default_factory=dict)
    # The longest a lease may be held without a renewal (seconds); longer asks are capped.
    max_lease_ttl: float = 3600.0
    # The autoscaler's settings ([daemon.scale]).
    scale: ScaleSettings = ScaleSettings()
    # Admission: a global in-flight cap, per-type and per-caller limits ([daemon.limits]).
    limits: DaemonLimits = field(default_factory=DaemonLimits)
    # Hooks: hosts a url hook may post to besides loopback ones ("name" or "name:port"),
    # commands running at once (daemon-wide), events waiting per hook before drops.
    hook_hosts: tuple[str, ...] = ()
    hook_max_running: int = 4
    hook_queue: int = 100
    # Top-level tables of config.toml, not of [daemon]: `[alerts.NAME]` and `[hooks.NAME]`.
    alerts: tuple[AlertRule, ...] = ()
    hooks: tuple[HookSpec, ...] = ()

    @classmethod
    def load(cls, path: Path) -> DaemonConfig:
        """Read `[daemon]` from a TOML file; a missing file gives the defaults.

        The file may be a symlink (into a dotfiles repository, say), but what it is must be
        ours and writable by nobody else (`engctl.trust`).
        """
        try:
            trust.check_followed(str(path))
            data = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except IsADirectoryError:
            raise SpecError(f"{path}: cannot read: is a folder") from None
        except OSError as exc:
            raise SpecError(f"{path}: cannot read: {exc.strerror}") from exc
        doc = parse_toml(decode_text(data, str(path)), str(path))
        unknown = sorted(set(doc) - {"daemon", "alerts", "hooks"})
        if unknown:
            raise SpecError(
                f"{path}: {unknown[0]}: unknown table (expected [daemon], [alerts.NAME],"
                " [hooks.NAME])"
            )
        section = doc.get("daemon", {})
        if not isinstance(section, dict):
            raise SpecError(f"{path}: [daemon] must be a table")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in section.items():
            if key not in known or key in TOP_LEVEL:
                raise SpecError(f"{path}: daemon.{key}: unknown key {key!r}")
            if key == "policy":
                values[key] = parse_policy_table(value, f"{path}: daemon.policy")
                continue
            if key == "limits":
                values[key] = parse_daemon_limits(value, f"{path}: daemon.limits")
                continue
            if key == "hook_hosts":
                if not isinstance(value, list) or not all(
                    isinstance(h, str) and h.strip() for h in value
                ):
                    raise SpecError(
                        f"{path}: daemon.hook_hosts: expected a list of host names such as"
                        f' ["alertmanager.lan"], got {value!r}'
                    )
                values[key] = tuple(h.strip() for h in value)
                continue
            if key == "metrics":
                if not isinstance(value, bool):
                    raise SpecError(
                        f"{path}: daemon.metrics: expected true or false, got {value!r}"
                    )
                values[key] = value
                continue
            if key == "metrics_port" and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535
            ):
                raise SpecError(
                    f"{path}: daemon.metrics_port: expected a port from 1 to 65535 (0: off),"
                    f" got {value!r}"
                )
            if key == "metrics_port":
                values[key] = value
                continue
            if key == "capability_weights":
                values[key] = _capability_weights(value, path)
                continue
            if key == "scale":
                values[key] = _scale_settings(value, path)
                continue
            if key == "default_strategy":
                if value not in STRATEGIES:
                    raise SpecError(
                        f"{path}: daemon.{key}: expected one of {', '.join(STRATEGIES)},"
                        f" got {value!r}"
                    )
                values[key] = StrategyName(value)
                continue
            default = getattr(cls, key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise SpecError(f"{path}: daemon.{key}: expected a positive number, got {value!r}")
            if isinstance(default, int) and not isinstance(value, int):
                # int(0.5) would silently become 0
                raise SpecError(f"{path}: daemon.{key}: expected a positive integer, got {value!r}")
            values[key] = type(default)(value)
        values["alerts"] = parse_alerts(doc.get("alerts", {}), f"{path}: alerts")
        values["hooks"] = parse_hooks(
            doc.get("hooks", {}), values.get("hook_hosts", ()), f"{path}: hooks"
        )
        return cls(**values)


# Fields of DaemonConfig that are top-level tables of config.toml, not keys of [daemon].
TOP_LEVEL = ("alerts", "hooks")


def config_table(config: DaemonConfig) -> dict[str, Any]:
    """The settings as the `[daemon]` table of config.toml (what tomli-w can write back)."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in TOP_LEVEL:
            continue
        if f.name == "capability_weights":
            value = asdict(value)
        elif f.name == "default_strategy":
            value = value.value
        elif f.name == "policy":
            value = overrides_to_toml(value)
        elif f.name == "scale":
            value = {"min_available_memory": value.min_available_memory, "interval": value.interval}
        elif f.name == "limits":
            value = value.to_toml()
        elif f.name == "hook_hosts":
            value = list(value)
        out[f.name] = value
    return out


def rules_tables(config: DaemonConfig) -> dict[str, dict[str, Any]]:
    """`[alerts.NAME]` and `[hooks.NAME]` as config.toml writes them: {"alerts", "hooks"}."""
    return {
        "alerts": {r.name: r.to_toml() for r in config.alerts},
        "hooks": {h.name: h.to_toml() for h in config.hooks},
    }


def _capability_weights(table: Any, path: Path) -> CapabilityWeights:
    where = f"{path}: daemon.capability_weights"
    if not isinstance(table, dict):
        raise SpecError(f"{where}: expected a table such as {{ load = 0.5 }}")
    weights = asdict(CapabilityWeights())
    for key, value in table.items():
        if key not in weights:
            raise SpecError(
                f"{where}.{key}: unknown factor (expected {', '.join(CAPABILITY_FACTORS)})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise SpecError(f"{where}.{key}: expected a number of 0 or more, got {value!r}")
        weights[key] = float(value)
    if not any(weights.values()):
        raise SpecError(f"{where}: at least one factor must weigh more than 0")
    return CapabilityWeights(**weights)


def _scale_settings(table: Any, path: Path) -> ScaleSettings:
    from engctl.models import parse_size  # the engine file's size syntax (512MiB, 1GB)

    where = f"{path}: daemon.scale"
    if not isinstance(table, dict):
        raise SpecError(f"{where}: expected a table such as {{ min_available_memory = \"1GiB\" }}")
    out = ScaleSettings()
    for key, value in table.items():
        if key == "min_available_memory":
            # 0 is off; anything else is a size, as `limits.max_rss` takes it
            off = value == 0 and not isinstance(value, bool)
            size = 0 if off else parse_size(value, f"{where}.{key}")
            out = replace(out, min_available_memory=size)
        elif key == "interval":
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf
            ):
                raise SpecError(f"{where}.interval: expected a positive number, got {value!r}")
            out = replace(out, interval=float(value))
        else:
            raise SpecError(
                f"{where}.{key}: unknown key {key!r} (expected min_available_memory, interval)"
            )
    return out


def decode_text(data: bytes, source: str) -> str:
    """A file's bytes as UTF-8 text (what TOML requires); else a SpecError naming the line."""
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError(
            f"{source}: not UTF-8 text: byte 0x{data[exc.start]:02x} at line {line},"
            f" column {column}"
        ) from None


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML; an error names the source with its line and column."""
    import tomllib  # only commands that read files pay for the parser

    try:
        return tomllib.loads(text)
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise SpecError(f"{source}: invalid TOML: arrays or tables nested too deeply") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib puts "(at line L, column C)" at the end of its message, except for errors
        # found at the end of the input ("(at end of document)"): name that place too.
        message = str(exc)
        if message.endswith("(at end of document)"):
            line = text.count("\n") + 1
            column = len(text) - text.rfind("\n")
            message = message.removesuffix(")") + f", line {line}, column {column})"
        raise SpecError(f"{source}: invalid TOML: {message}") from exc
