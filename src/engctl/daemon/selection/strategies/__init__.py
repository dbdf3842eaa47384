"""The seven dispatch strategies, one module per family, and `default_strategies`.

Part of `engctl.daemon.selection` (see its privacy rule).

Imports nothing of the daemon outside `selection`.
"""

from __future__ import annotations

import random
import time

from engctl.config import CapabilityWeights
from engctl.protocol import StrategyName

from ..candidates import Clock
from .base import Strategy
from .capability import Capability
from .keyed import Affinity, ConsistentHash
from .load import LeastLoaded, WeightedRandom
from .rotation import RoundRobin, SmoothWeightedRoundRobin


def default_strategies(
    *,
    rng: random.Random | None = None,
    clock: Clock = time.monotonic,
    weights: CapabilityWeights | None = None,
) -> dict[StrategyName, Strategy]:
    """One instance of each strategy, sharing `rng` and `clock`."""
    rng = rng if rng is not None else random.Random()
    return {
        StrategyName.ROUND_ROBIN: RoundRobin(),
        StrategyName.WEIGHTED_ROUND_ROBIN: SmoothWeightedRoundRobin(),
        StrategyName.LEAST_LOADED: LeastLoaded(rng),
        StrategyName.WEIGHTED_RANDOM: WeightedRandom(rng),
        StrategyName.CAPABILITY: Capability(weights),
        StrategyName.AFFINITY: Affinity(rng=rng, clock=clock),
        StrategyName.CONSISTENT_HASH: ConsistentHash(rng=rng),
    }
