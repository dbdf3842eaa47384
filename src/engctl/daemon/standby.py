"""Standby: what to tell a request that no ready instance can take. Wait for instances on their
way (starting, restarting), fail at once saying why the matching engines are down, or leave
the filters' own diagnosis to stand.

Pure: plain values in, a decision out (the router gathers the values).

Imports the shared contract and the selection package only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from engctl.models import EngineSpec, split_instance_id

from .selection import Selector


@dataclass(frozen=True, slots=True)
class InstanceView:
    """An instance (or a oneshot engine) as `standby` judges it: its id, engine, and where it
    is headed: `ready`, `starting`, `restarting` (with the seconds to its next start when
    known), or down (`stopping`, `stopped`, `exited`, `fatal`) with its reason; or an
    autoscaled engine that may grow (`scaling`, its id the engine's name)."""

    id: str
    engine: str
    state: str
    reason: str = ""
    next_start: float | None = None


@dataclass(frozen=True, slots=True)
class Standby:
    """`wait`: what a request waits for (it may be served within its deadline); `error`:
    why it cannot be served by any registered engine that matches it."""

    wait: str = ""
    error: str = ""


_COMING = ("starting", "restarting", "scaling")


def standby(views: list[InstanceView], services: list[str], whole: bool = True) -> Standby | None:
    """Decide for a request that no ready instance can take: wait for instances that are on
    their way, fail at once saying why the matching engines are down (or take no requests),
    or None when nothing registered matches (or some match and serve: the filters' own
    diagnosis says more). `whole`: `views` holds every instance of their engines (no
    instance was pinned or left out). Pure: plain values in, a decision out."""
    coming = [v for v in views if v.state in _COMING]
    if coming:
        return Standby(wait=_describe(coming, views, _coming_phrase, whole))
    if any(v.state == "ready" for v in views):
        return None
    if views:
        return Standby(error=_describe(views, views, _down_phrase, whole))
    if services:
        if len(services) == 1:
            return Standby(error=f"{services[0]} is a service engine: it takes no requests")
        names = ", ".join(sorted(services))
        return Standby(error=f"{names} are service engines: they take no requests")
    return None


def _coming_phrase(views: list[InstanceView]) -> str:
    if all(v.state == "starting" for v in views):
        return "starting"
    if all(v.state == "scaling" for v in views):
        return "scaling up (a new instance starts)"
    starts = [v.next_start for v in views if v.next_start is not None]
    when = f" (next start in {min(starts):.1f}s)" if starts else ""
    return f"restarting{when}"


def _down_phrase(views: list[InstanceView]) -> str:
    v = views[0]
    return f"{v.state}: {v.reason}" if v.reason else v.state


def _describe(
    chosen: list[InstanceView],
    views: list[InstanceView],
    phrase: Callable[[list[InstanceView]], str],
    whole: bool,
) -> str:
    """Say "all instances of X are P" when `chosen` is every instance of one engine (`whole`:
    `views` holds them all) in one state, else each instance with its own phrase."""
    engines = {v.engine for v in chosen}
    if len(engines) == 1 and whole:
        name = next(iter(engines))
        every = [v for v in views if v.engine == name]
        if len(every) == len(chosen) and len({v.state for v in chosen}) == 1:
            if len(chosen) == 1 and chosen[0].id == name:
                return f"{name} is {phrase(chosen)}"  # a oneshot engine, or 0 instances
            return f"all instances of {name} are {phrase(chosen)}"
    return "; ".join(f"{v.id} is {phrase([v])}" for v in chosen)


def spec_matches(spec: EngineSpec, selector: Selector) -> bool:
    """Whether an engine passes the request's hard filters as registered (its instances
    may not be dispatchable yet)."""
    if selector.engine is not None and spec.name != selector.engine:
        return False
    if selector.type is not None and spec.type != selector.type:
        return False
    if selector.instance is not None and split_instance_id(selector.instance)[0] != spec.name:
        return False
    if selector.require and not selector.require <= frozenset(spec.capabilities):
        return False
    return all(spec.labels.get(k) == v for k, v in selector.labels)
