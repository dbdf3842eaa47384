"""Dispatch selection: hard filters, seven strategies, `--explain`, and the index that keeps a
pick cheap at a thousand instances (docs/architecture.md).

Pure code over plain values: no I/O, no processes, no asyncio; the clock and randomness are
injected. It imports the stdlib and the shared contract only, never the rest of the daemon: the
request layer feeds it observations (in flight, latency, eligibility, weight) and asks it for
decisions.

Privacy rule: a name with one leading underscore (a module-level helper, or a slot such as
`Candidate._in_flight` and `CandidateSet._free`) is private to this package. Any module of
`engctl.daemon.selection` may read and write it (strategies read the slots directly: a property
per member scanned would cost the hot path), and no module outside the package may touch it:
outside, candidates are read and changed through their public properties only (which keep every
set that holds them in step). `tests/unit/test_layering.py` checks it.

Modules: `candidates` (Candidate, CandidateSet, KeyMemory), `selector` (what a request asks),
`strategies/` (one module per family), `explain` (diagnosis and `--explain`), `pool` (the
index and `select`).
"""

from __future__ import annotations

from .candidates import Candidate, CandidateKind, CandidateSet, Change, KeyMemory
from .explain import Assessment, Explanation, NoMatch, Outcome, exclusion
from .pool import CandidatePool, Selection
from .selector import (
    FilterName,
    Selector,
    parse_label,
    parse_strategy,
    selector_from_params,
    selector_key,
)
from .strategies import default_strategies
from .strategies.base import Strategy, Verdict
from .strategies.capability import Capability, capability_match, performance_factor
from .strategies.keyed import Affinity, ConsistentHash, ring_hash, ring_points
from .strategies.load import LeastLoaded, WeightedRandom
from .strategies.rotation import (
    RoundRobin,
    SmoothWeightedRoundRobin,
    quantize_weights,
    smooth_schedule,
)

__all__ = [
    "Affinity",
    "Assessment",
    "Candidate",
    "CandidateKind",
    "CandidatePool",
    "CandidateSet",
    "Capability",
    "Change",
    "ConsistentHash",
    "Explanation",
    "FilterName",
    "KeyMemory",
    "LeastLoaded",
    "NoMatch",
    "Outcome",
    "RoundRobin",
    "Selection",
    "Selector",
    "SmoothWeightedRoundRobin",
    "Strategy",
    "Verdict",
    "WeightedRandom",
    "capability_match",
    "default_strategies",
    "exclusion",
    "parse_label",
    "parse_strategy",
    "performance_factor",
    "quantize_weights",
    "ring_hash",
    "ring_points",
    "selector_from_params",
    "selector_key",
    "smooth_schedule",
]
