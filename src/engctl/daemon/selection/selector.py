"""What one request asks of selection: its hard filters, preferences, key and strategy.

Part of `engctl.daemon.selection` (see its privacy rule): imports the stdlib, the shared
contract and `candidates` only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engctl.errors import InvalidParamsError, UsageError
from engctl.protocol import StrategyName

from .candidates import Candidate, FilterKey, _matches_key


class FilterName(StrEnum):
    """The hard filters, in the order they are applied and reported."""

    TYPE = "type"
    ENGINE = "engine"
    INSTANCE = "instance"
    CAPABILITY = "capability"
    LABEL = "label"
    LEASE = "lease"
    ELIGIBILITY = "eligibility"


def parse_strategy(name: str) -> StrategyName:
    """The strategy called `name`; a usage error lists the valid names."""
    try:
        return StrategyName(name)
    except ValueError as exc:
        valid = ", ".join(s.value for s in StrategyName)
        raise UsageError(f"unknown strategy {name!r} (strategies: {valid})") from exc


def parse_label(text: str) -> tuple[str, str]:
    """One `--label k=v` as a pair; the value may contain '=' but the key may not be empty."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"label {text!r} is not key=value")
    return key, value.strip()


@dataclass(frozen=True, slots=True)
class Selector:
    """What one request asks for: hard filters, preferences, a key and a strategy.

    `require` (`--cap`) and `labels` (`--label k=v`, all must match) are hard filters like
    type, engine and instance; `prefer` (`--prefer`) only scores. `key` drives `affinity` and
    `consistent_hash`; `strategy` None means the pool's default. Build one with `Selector.of`.
    """

    type: str | None = None
    engine: str | None = None
    instance: str | None = None
    require: frozenset[str] = frozenset()
    prefer: frozenset[str] = frozenset()
    labels: frozenset[tuple[str, str]] = frozenset()
    key: str | None = None
    strategy: StrategyName | None = None
    # A lease's requests: only its instance (`instance`, pinned by the router) may take them.
    lease: str | None = None
    filter_key: FilterKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once: the pool looks its candidate set up by this on every request.
        object.__setattr__(self, "filter_key", (self.type, self.engine, self.require, self.labels))

    @classmethod
    def of(
        cls,
        *,
        type: str | None = None,
        engine: str | None = None,
        instance: str | None = None,
        require: Iterable[str] = (),
        prefer: Iterable[str] = (),
        labels: Mapping[str, str] | Iterable[str] | None = None,
        key: str | None = None,
        strategy: str | None = None,
        lease: str | None = None,
    ) -> Selector:
        """A selector from CLI-shaped values: labels as a mapping or as `k=v` strings."""
        if labels is None:
            pairs: frozenset[tuple[str, str]] = frozenset()
        elif isinstance(labels, Mapping):
            pairs = frozenset((str(k), str(v)) for k, v in labels.items())
        else:
            pairs = frozenset(parse_label(text) for text in labels)
        return cls(
            type=type,
            engine=engine,
            instance=instance,
            require=frozenset(require),
            prefer=frozenset(prefer),
            labels=pairs,
            key=key,
            strategy=None if strategy is None else parse_strategy(strategy),
            lease=lease,
        )

    def matches(self, candidate: Candidate) -> bool:
        """Whether `candidate` passes every hard filter, eligibility included."""
        if self.instance is not None and candidate._id != self.instance:
            return False
        if self.lease is not None or candidate.lease is not None:
            return candidate.lease == self.lease and _matches_key(candidate, self.filter_key)
        return candidate._eligible and _matches_key(candidate, self.filter_key)

    def to_json(self) -> dict[str, Any]:
        """The selector for `--explain --json` and error data."""
        return {
            "type": self.type,
            "engine": self.engine,
            "instance": self.instance,
            "require": sorted(self.require),
            "prefer": sorted(self.prefer),
            "labels": dict(sorted(self.labels)),
            "key": self.key,
            "strategy": None if self.strategy is None else self.strategy.value,
            "lease": self.lease,
        }


_KEYED = (StrategyName.AFFINITY, StrategyName.CONSISTENT_HASH)


def selector_key(params: Mapping[str, Any]) -> Any:
    """A hashable key of an `exec` call's selection parameters (for a cache of selectors;
    unhashable junk is left in, for validation to refuse)."""
    common_type = params.get("type") if len(params) == 2 else None
    if type(common_type) is str:
        # The common call, {input, type}: its key is the type (a str never equals the
        # tuples below), one lookup instead of eight.
        return common_type
    return (
        params.get("type"),
        params.get("engine"),
        params.get("instance"),
        _as_tuple(params.get("require")),
        _as_tuple(params.get("prefer")),
        _as_tuple(params.get("labels")),
        params.get("key"),
        params.get("strategy"),
        params.get("lease"),
    )


def _as_tuple(value: Any) -> Any:
    """A hashable form of a list parameter (unhashable junk is left for validation)."""
    return tuple(value) if isinstance(value, list) else value


def selector_from_params(params: Mapping[str, Any]) -> Selector:
    """The selector of an `exec` call's parameters; InvalidParamsError for a value of the
    wrong type, UsageError for a keyed strategy without its key."""
    def strings(key: str) -> list[str]:
        value = params.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidParamsError(f"parameter {key!r} must be a list of strings")
        return value

    def opt(key: str) -> str | None:
        value = params.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidParamsError(f"parameter {key!r} must be a string")
        return value

    selector = Selector.of(
        type=opt("type"),
        engine=opt("engine"),
        instance=opt("instance"),
        require=strings("require"),
        prefer=strings("prefer"),
        labels=strings("labels"),
        key=opt("key"),
        strategy=opt("strategy"),
        lease=opt("lease"),
    )
    if selector.strategy in _KEYED and selector.key is None:
        raise UsageError(f"strategy {selector.strategy} needs --key (the stickiness key)")
    return selector
