"""Unit tests of dispatch selection: hard filters and their reasons, the seven strategies'
invariants, the incremental index, and `--explain`. Pure: no process, no clock, no sleep."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engctl.config import CapabilityWeights
from engctl.daemon.selection import (
    Affinity,
    Candidate,
    CandidatePool,
    CandidateSet,
    Capability,
    ConsistentHash,
    FilterName,
    KeyMemory,
    LeastLoaded,
    Outcome,
    Selector,
    default_strategies,
    parse_label,
    parse_strategy,
    quantize_weights,
    smooth_schedule,
)
from engctl.errors import EXIT_NO_ELIGIBLE, NoEligibleEngineError, UsageError
from engctl.protocol import StrategyName

S = StrategyName


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def cand(id: str, type: str = "onnx", **kw: object) -> Candidate:
    """A candidate whose engine is the part of `id` before '#'."""
    return Candidate(id, id.split("#")[0], type, **kw)  # type: ignore[arg-type]


def make_pool(cands: Iterable[Candidate], seed: int = 0, **kw: object) -> CandidatePool:
    """A pool with a seeded RNG holding `cands`."""
    pool = CandidatePool(rng=random.Random(seed), **kw)  # type: ignore[arg-type]
    for c in cands:
        pool.add(c)
    return pool


def pick(pool: CandidatePool, strategy: StrategyName, **sel: object) -> Candidate | None:
    """The candidate `pool` selects for a selector built from `sel` with `strategy`."""
    return pool.select(Selector.of(strategy=strategy.value, **sel)).candidate  # type: ignore[arg-type]


def ids(cs: Iterable[Candidate | None]) -> list[str | None]:
    """The ids of a sequence of picks."""
    return [None if c is None else c.id for c in cs]


def nginx_swrr(weights: list[int], n: int) -> list[int]:
    """Reference: nginx's smooth weighted round robin, peer by peer, for `n` picks."""
    current = [0] * len(weights)
    total = sum(weights)
    out = []
    for _ in range(n):
        best = -1
        for i, w in enumerate(weights):
            current[i] += w
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        out.append(best)
    return out


# --- selectors and parsing ----------------------------------------------------------------


def test_selector_of_normalises_cli_values() -> None:
    """Selector.of takes labels as k=v strings or a mapping and checks the strategy name."""
    a = Selector.of(
        type="onnx", require=["fp16"], labels=["tier=gold", "zone = a"], strategy="affinity"
    )
    b = Selector.of(type="onnx", require={"fp16"}, labels={"zone": "a", "tier": "gold"})
    assert a.labels == b.labels == frozenset({("tier", "gold"), ("zone", "a")})
    assert a.strategy is S.AFFINITY
    assert a.filter_key == b.filter_key
    assert a.to_json()["labels"] == {"tier": "gold", "zone": "a"}


def test_bad_label_and_strategy_are_usage_errors() -> None:
    """A label without '=' or an unknown strategy is a usage error naming the valid choices."""
    assert parse_label("k=v=w") == ("k", "v=w")
    with pytest.raises(UsageError, match="not key=value"):
        parse_label("tier")
    with pytest.raises(UsageError, match="round_robin, weighted_round_robin"):
        parse_strategy("fastest")


# --- hard filters and their reasons -------------------------------------------------------


def fleet() -> CandidatePool:
    """Two types: echo (one engine) and http (two engines with capabilities and labels)."""
    return make_pool(
        [
            cand("echo#0", "echo"),
            cand("web#0", "http", capabilities={"fp32", "batch"}, labels={"tier": "gold"}),
            cand("web#1", "http", capabilities={"fp32", "batch"}, labels={"tier": "gold"}),
            cand("api#0", "http", capabilities={"fp32"}, labels={"tier": "silver"}),
        ]
    )


def test_unknown_type_lists_the_types() -> None:
    """A type nobody serves names the filter and lists the types that exist."""
    sel = fleet().select(Selector.of(type="onnx"))
    assert sel.outcome is Outcome.NO_MATCH and sel.candidate is None
    assert sel.no_match is not None and sel.no_match.filter is FilterName.TYPE
    assert sel.message == "no engine of type 'onnx' (types: echo, http)"
    assert sel.no_match.available == ("echo", "http")


def test_unknown_or_mismatched_engine_is_reported() -> None:
    """An unknown engine lists the engines of the type; one of another type says its type."""
    pool = fleet()
    msg = pool.select(Selector.of(type="http", engine="nope")).message
    assert msg == "no engine named 'nope' (engines of type http: api, web)"
    msg = pool.select(Selector.of(type="http", engine="echo")).message
    assert msg == "engine 'echo' is of type 'echo', not 'http'"


def test_unknown_instance_lists_the_instances() -> None:
    """An explicit instance that does not exist lists the engine's instances."""
    sel = fleet().select(Selector.of(engine="web", instance="web#7"))
    assert sel.no_match is not None and sel.no_match.filter is FilterName.INSTANCE
    assert sel.message == "no instance 'web#7' (instances of engine web: web#0, web#1)"


def test_missing_capability_lists_capabilities_seen() -> None:
    """A required capability nobody of the type has is named, with those seen in the type."""
    sel = fleet().select(Selector.of(type="http", require=["fp16"]))
    assert sel.no_match is not None and sel.no_match.filter is FilterName.CAPABILITY
    assert (
        sel.message
        == "no instance of type http has capability fp16 (capabilities seen: batch, fp32)"
    )


def test_missing_label_lists_labels_seen() -> None:
    """Labels are applied after capabilities, and the message lists the labels that exist."""
    sel = fleet().select(Selector.of(type="http", require=["batch"], labels=["tier=silver"]))
    assert sel.no_match is not None and sel.no_match.filter is FilterName.LABEL
    assert sel.message == (
        "no instance of type http with batch has label tier=silver (labels seen: tier=gold)"
    )


def test_all_ineligible_names_each_reason() -> None:
    """When every match is ineligible, the reason says so and quotes why for each instance."""
    pool = fleet()
    for id_, why in (("web#0", "isolated until 12:03"), ("web#1", "draining")):
        c = pool.get(id_)
        c.ineligible_reason = why
        c.eligible = False
    sel = pool.select(Selector.of(engine="web"))
    assert sel.no_match is not None and sel.no_match.filter is FilterName.ELIGIBILITY
    assert sel.message == (
        "no eligible instance of engine web: 2 instances match but none is eligible "
        "(web#0: isolated until 12:03, web#1: draining)"
    )


def test_all_full_is_distinct_from_nothing_eligible() -> None:
    """Every match at max_concurrency is ALL_FULL (queue) with no error, not NO_MATCH."""
    pool = fleet()
    for c in pool:
        if c.type == "http":
            c.in_flight = c.max_concurrency
    for name in S:
        sel = pool.select(Selector.of(type="http", key="k", strategy=name.value))
        assert sel.outcome is Outcome.ALL_FULL and sel.candidate is None, name
        assert sel.message == "all 3 instances of type http are full (in flight 3/3)"
        sel.raise_if_no_match()  # a wait, not an error


def test_no_match_raises_no_eligible_engine_error() -> None:
    """raise_if_no_match gives exit code 4 with the filter, what exists and the explanation."""
    sel = fleet().select(Selector.of(type="onnx"), explain=True)
    with pytest.raises(NoEligibleEngineError) as info:
        sel.raise_if_no_match()
    err = info.value
    assert err.exit_code == EXIT_NO_ELIGIBLE
    assert err.message == "no engine of type 'onnx' (types: echo, http)"
    assert err.data["filter"] == "type" and err.data["available"] == ["echo", "http"]
    assert {c["excluded_by"] for c in err.data["explain"]["candidates"]} == {"type"}


def test_empty_pool_says_nothing_is_registered() -> None:
    """An empty pool has no filter to blame and says so."""
    sel = CandidatePool().select(Selector())
    assert sel.no_match is not None and sel.no_match.filter is None
    assert sel.message == "no dispatchable instances are registered"


def test_explicit_instance_is_picked_or_reported_full() -> None:
    """An explicit instance bypasses the strategy, and is ALL_FULL when at capacity."""
    pool = fleet()
    assert ids([pick(pool, S.ROUND_ROBIN, instance="web#1")]) == ["web#1"]
    pool.get("web#1").in_flight = 1
    sel = pool.select(Selector.of(instance="web#1"))
    assert (
        sel.outcome is Outcome.ALL_FULL and sel.message == "instance web#1 is full (in flight 1/1)"
    )
    sel = pool.select(Selector.of(type="echo", instance="web#0"))
    assert sel.no_match is not None and sel.no_match.filter is FilterName.INSTANCE
    assert sel.message == "instance 'web#0' is of type 'http', not 'echo'"


# --- the index ------------------------------------------------------------------------------


def test_sets_follow_eligibility_membership_and_load() -> None:
    """A cached set gains and loses members as instances are added, removed, isolated and
    restored, and keeps its free list and in-flight total in step with the setters."""
    pool = make_pool([cand("a#0"), cand("a#1"), cand("b#0", "http")])
    s = pool.candidate_set(Selector(type="onnx"))
    assert ids(s.members) == ["a#0", "a#1"]
    pool.get("a#0").eligible = False
    assert ids(s.members) == ["a#1"]
    pool.add(cand("a#2", max_concurrency=2))
    pool.get("a#0").eligible = True
    assert ids(s.members) == ["a#0", "a#1", "a#2"]  # registration order, not join order
    pool.get("a#2").in_flight = 2
    pool.get("a#1").in_flight = 1
    assert ids(s.free) == ["a#0"] and s.in_flight_total == 3 and s.capacity == 4
    pool.get("a#2").in_flight = 1
    assert ids(s.free) == ["a#0", "a#2"]
    removed = pool.remove("a#1")
    assert ids(s.members) == ["a#0", "a#2"] and s.in_flight_total == 1
    assert "a#1" not in pool and removed.eligible
    assert pool.candidate_set(Selector(type="onnx")) is s  # cached, not rebuilt


def test_set_cache_is_bounded_and_releases_members() -> None:
    """Past max_sets the least recently used set is dropped and its members forget it."""
    pool = make_pool([cand("a#0", capabilities={"x", "y"})], max_sets=2)
    first = pool.candidate_set(Selector.of(require=["x"]))
    pool.candidate_set(Selector.of(require=["y"]))
    pool.candidate_set(Selector.of(require=["x"]))  # refreshes the first
    pool.candidate_set(Selector.of(require=["x", "y"]))
    assert pool.candidate_set(Selector.of(require=["x"])) is first
    assert len(pool.get("a#0")._sets) == 2


def test_standalone_set_drops_members_that_become_ineligible() -> None:
    """A set built directly takes eligible candidates only and drops one isolated later."""
    a, b, c = cand("a#0"), cand("a#1", eligible=False), cand("a#2")
    s = CandidateSet([a, b, c])
    assert ids(s.members) == ["a#0", "a#2"]
    c.eligible = False
    assert ids(s.members) == ["a#0"] and c not in s and a in s


def test_pool_rejects_duplicates_and_bad_values() -> None:
    """Duplicate ids, negative loads and weights, and zero capacity are refused loudly."""
    pool = make_pool([cand("a#0")])
    with pytest.raises(ValueError, match="already in the pool"):
        pool.add(cand("a#0"))
    with pytest.raises(ValueError):
        cand("a#1", max_concurrency=0)
    with pytest.raises(ValueError):
        pool.get("a#0").effective_weight = -1.0
    with pytest.raises(ValueError):
        pool.get("a#0").in_flight = -1


def test_key_memory_expires_and_is_bounded() -> None:
    """Keys expire after the TTL on the injected clock and the oldest go first when full."""
    clock = FakeClock()
    mem = KeyMemory(capacity=2, ttl=10.0, clock=clock)
    mem.put("a", "x#0")
    mem.put("b", "x#1")
    clock.now += 5
    mem.put("a", "x#2")
    mem.put("c", "x#3")  # evicts b, the least recently put
    assert (mem.get("a"), mem.get("b"), mem.get("c")) == ("x#2", None, "x#3")
    clock.now += 10.5
    assert mem.get("a") is None and len(mem) == 1


# --- invariants of every strategy -----------------------------------------------------------

MEMBER = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["onnx", "http"]),
        "caps": st.sets(st.sampled_from(["fp16", "fp32"])),
        "weight": st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]),
        "max": st.integers(1, 3),
        "latency": st.one_of(st.none(), st.integers(1, 50).map(float)),
        "eligible": st.booleans(),
    }
)


@settings(max_examples=60, deadline=None)
@given(members=st.lists(MEMBER, min_size=1, max_size=40), data=st.data())
def test_no_strategy_picks_an_ineligible_full_or_filtered_instance(
    members: list[dict[str, object]], data: st.DataObject
) -> None:
    """Under random loads, eligibility flips and weight changes, every strategy picks only an
    eligible member below max_concurrency that passes the filters, and says ALL_FULL or
    NO_MATCH exactly when that is the truth."""
    pool = make_pool(
        Candidate(
            f"e{i % 3}#{i}",
            f"e{i % 3}",
            str(m["type"]),
            capabilities=m["caps"],  # type: ignore[arg-type]
            effective_weight=m["weight"],  # type: ignore[arg-type]
            max_concurrency=m["max"],  # type: ignore[arg-type]
            latency_ms=m["latency"],  # type: ignore[arg-type]
            eligible=m["eligible"],  # type: ignore[arg-type]
        )
        for i, m in enumerate(members)
    )
    everyone = list(pool)
    for _ in range(30):
        op = data.draw(st.sampled_from(["pick", "pick", "load", "eligible", "weight"]))
        c = data.draw(st.sampled_from(everyone))
        if op == "load":
            c.in_flight = data.draw(st.integers(0, c.max_concurrency))
        elif op == "eligible":
            c.eligible = not c.eligible
        elif op == "weight":
            c.effective_weight = data.draw(st.sampled_from([0.0, 0.25, 1.0, 4.0]))
        else:
            selector = Selector.of(
                type=data.draw(st.sampled_from([None, "onnx", "http"])),
                require=data.draw(st.sampled_from([(), ("fp16",)])),
                key=data.draw(st.sampled_from([None, "k1", "k2", "k3"])),
                strategy=data.draw(st.sampled_from(list(S))).value,
            )
            matching = [x for x in everyone if selector.matches(x)]
            sel = pool.select(selector)
            if not matching:
                assert sel.outcome is Outcome.NO_MATCH
            elif all(x.full for x in matching):
                assert sel.outcome is Outcome.ALL_FULL
            else:
                assert sel.outcome is Outcome.PICKED and sel.candidate is not None
                assert sel.candidate in matching and not sel.candidate.full
                sel.candidate.in_flight += 1


# --- round robin ----------------------------------------------------------------------------


def test_round_robin_cycles_evenly_in_order() -> None:
    """Round robin gives each member one turn per round, in registration order."""
    pool = make_pool(cand(f"a#{k}", max_concurrency=8) for k in range(5))
    picks = ids(pick(pool, S.ROUND_ROBIN, type="onnx") for _ in range(20))
    assert picks == [f"a#{k}" for k in range(5)] * 4


def test_round_robin_skips_full_members_and_keeps_its_place() -> None:
    """A full member loses its turn; a member that joins takes its turn without a reset."""
    pool = make_pool(cand(f"a#{k}") for k in range(4))
    assert ids([pick(pool, S.ROUND_ROBIN)]) == ["a#0"]
    pool.get("a#1").in_flight = 1
    assert ids([pick(pool, S.ROUND_ROBIN)]) == ["a#2"]
    pool.get("a#1").in_flight = 0
    pool.add(cand("a#4"))
    assert ids(pick(pool, S.ROUND_ROBIN) for _ in range(5)) == ["a#3", "a#4", "a#0", "a#1", "a#2"]


# --- smooth weighted round robin ------------------------------------------------------------


def test_smooth_wrr_interleaves_5_1_1_like_nginx() -> None:
    """Weights 5,1,1 give a a b a c a a every 7 picks: exact shares, never five in a row."""
    pool = make_pool(
        [
            cand("a#0", weight=5, max_concurrency=99),
            cand("b#0", max_concurrency=99),
            cand("c#0", max_concurrency=99),
        ]
    )
    picks = ids(pick(pool, S.WEIGHTED_ROUND_ROBIN) for _ in range(21))
    assert picks == ["a#0", "a#0", "b#0", "a#0", "c#0", "a#0", "a#0"] * 3
    for k in range(0, 21, 7):
        assert Counter(picks[k : k + 7]) == {"a#0": 5, "b#0": 1, "c#0": 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=8))
def test_smooth_schedule_equals_nginx(weights: list[int]) -> None:
    """The grouped schedule is exactly nginx's peer-by-peer sequence over a cycle."""
    assert smooth_schedule(weights) == nginx_swrr(weights, sum(weights))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0]), min_size=1, max_size=12))
def test_smooth_wrr_respects_weights_exactly_per_cycle(weights: list[float]) -> None:
    """Over each cycle, every member is picked in exact proportion to its effective weight."""
    pool = make_pool(
        cand(f"e{k}#0", weight=w, max_concurrency=10**6) for k, w in enumerate(weights)
    )
    units = [round(w * 2) for w in weights]
    scale = __import__("math").gcd(*units)
    cycle = sum(units) // scale
    picks = Counter(ids(pick(pool, S.WEIGHTED_ROUND_ROBIN) for _ in range(3 * cycle)))
    assert picks == {f"e{k}#0": 3 * u // scale for k, u in enumerate(units)}


def test_smooth_wrr_follows_a_downweight() -> None:
    """Lowering an effective weight rebuilds the cycle with the new shares."""
    pool = make_pool(
        [cand("a#0", weight=2, max_concurrency=99), cand("b#0", weight=2, max_concurrency=99)]
    )
    assert Counter(ids(pick(pool, S.WEIGHTED_ROUND_ROBIN) for _ in range(4))) == {
        "a#0": 2,
        "b#0": 2,
    }
    pool.get("a#0").effective_weight = 0.5
    picks = ids(pick(pool, S.WEIGHTED_ROUND_ROBIN) for _ in range(10))
    assert Counter(picks) == {"a#0": 2, "b#0": 8}
    assert "a#0a#0" not in "".join(str(p) for p in picks)


def test_zero_weight_is_a_last_resort() -> None:
    """A member of effective weight 0 is picked only when no weighted member is free."""
    pool = make_pool([cand("a#0", weight=0), cand("b#0")])
    for name in (S.WEIGHTED_ROUND_ROBIN, S.WEIGHTED_RANDOM):
        assert {p for p in ids(pick(pool, name) for _ in range(20))} == {"b#0"}
    pool.get("b#0").in_flight = 1
    for name in (S.WEIGHTED_ROUND_ROBIN, S.WEIGHTED_RANDOM):
        assert ids([pick(pool, name)]) == ["a#0"]


def test_quantize_weights_is_exact_then_bounded() -> None:
    """Two-decimal weights quantise exactly (over their gcd); odd ones coarsen to fit."""
    assert quantize_weights([1.0, 0.5, 0.25]) == [4, 2, 1]
    assert quantize_weights([0.0, 2.0, 2.0]) == [0, 1, 1]
    q = quantize_weights([random.Random(k).uniform(0.01, 9.0) for k in range(1000)])
    assert all(x >= 1 for x in q)
    assert sum(q) <= 65_536 and sum(q) * len(set(q)) <= 400_000


# --- weighted random ------------------------------------------------------------------------


def test_weighted_random_respects_weights_statistically() -> None:
    """Over 40,000 seeded picks, shares are within 1.5 points of weights 1:2:7."""
    pool = make_pool(
        [
            cand("a#0", weight=1, max_concurrency=99),
            cand("b#0", weight=2, max_concurrency=99),
            cand("c#0", weight=7, max_concurrency=99),
        ],
        seed=42,
    )
    n = 40_000
    got = Counter(ids(pick(pool, S.WEIGHTED_RANDOM) for _ in range(n)))
    for id_, share in (("a#0", 0.1), ("b#0", 0.2), ("c#0", 0.7)):
        assert abs(got[id_] / n - share) < 0.015, (id_, got)


# --- least loaded ---------------------------------------------------------------------------


def test_least_loaded_prefers_lower_load_and_spreads_ties() -> None:
    """In a small set the least loaded member (relative to its capacity) wins, and idle
    members share the work instead of the first one taking it all."""
    pool = make_pool(
        [
            cand("a#0", max_concurrency=4, in_flight=2),
            cand("b#0", max_concurrency=2, in_flight=1),
            cand("c#0", max_concurrency=4, in_flight=1),
        ]
    )
    assert ids([pick(pool, S.LEAST_LOADED)]) == ["c#0"]  # 1/4 beats 2/4 and 1/2
    idle = make_pool(cand(f"a#{k}", max_concurrency=4) for k in range(4))
    assert set(ids(pick(idle, S.LEAST_LOADED) for _ in range(4))) == {"a#0", "a#1", "a#2", "a#3"}


def test_least_loaded_shares_equal_loads_in_proportion_to_weight() -> None:
    """Between equal loads the member of higher effective weight goes first, and idle picks
    are shared 1:3:2 like the weights (earliest virtual deadline first), not piled on it."""
    pool = make_pool([cand("a#0", weight=1), cand("b#0", weight=3), cand("c#0", weight=2)])
    assert ids([pick(pool, S.LEAST_LOADED)]) == ["b#0"]
    got = Counter(ids(pick(pool, S.LEAST_LOADED) for _ in range(599)))
    assert {k: round(v / 100) for k, v in got.items()} == {"a#0": 1, "b#0": 3, "c#0": 2}


def test_least_loaded_counts_in_flight_per_unit_of_weight() -> None:
    """Weighted least request (Envoy): 2 in flight at weight 1 is less load than 1 in flight
    at weight 0.25 (issue 10.8: a downweighted member used to win on its raw count)."""
    pool = make_pool(
        [
            cand("a#0", max_concurrency=8, in_flight=2),
            cand("b#0", max_concurrency=8, in_flight=1, weight=1.0, effective_weight=0.25),
        ]
    )
    assert ids([pick(pool, S.LEAST_LOADED)]) == ["a#0"]


def test_least_loaded_uses_two_choices_at_scale() -> None:
    """Above 16 members, two random free members are compared: the most loaded member never
    wins, and idle members win far more often than their share of the set."""
    cands = [cand(f"a#{k}", max_concurrency=4, in_flight=k % 4) for k in range(99)]
    pool = make_pool([*cands, cand("hot#0", max_concurrency=100, in_flight=99)], seed=3)
    picks = [pick(pool, S.LEAST_LOADED) for _ in range(5000)]
    assert "hot#0" not in ids(picks)
    idle_share = sum(1 for c in picks if c is not None and c.in_flight == 0) / len(picks)
    assert idle_share > 0.40  # idle members are a quarter of the set; two choices: 1 - 0.75²


# --- capability (scored) --------------------------------------------------------------------


def scored_pool() -> CandidatePool:
    """Two instances whose factors are easy to compute by hand."""
    return make_pool(
        [
            cand(
                "a#0",
                capabilities={"fp16", "batch"},
                max_concurrency=4,
                in_flight=1,
                latency_ms=10.0,
            ),
            cand("b#0", capabilities={"fp16"}, max_concurrency=2, latency_ms=20.0),
        ]
    )


def test_capability_score_matches_hand_computed_factors() -> None:
    """a: cap 1, load 3/4, perf 1, affinity 0 -> 0.90; b: cap 1/2, load 1, perf 1/2,
    affinity 1 -> 0.825; a wins and explain shows each factor and score."""
    pool = scored_pool()
    pool.memory.put("k", "b#0")
    sel = pool.select(
        Selector.of(prefer=["fp16", "batch"], key="k", strategy="capability"), explain=True
    )
    assert sel.candidate is not None and sel.candidate.id == "a#0"
    assert sel.explanation is not None
    lines = {a.instance: a for a in sel.explanation.candidates}
    assert lines["a#0"].factors == {
        "type": 1.0,
        "capability": 1.0,
        "load": 0.75,
        "performance": 1.0,
        "affinity": 0.0,
    }
    assert lines["b#0"].factors == {
        "type": 1.0,
        "capability": 0.5,
        "load": 1.0,
        "performance": 0.5,
        "affinity": 1.0,
    }
    assert lines["a#0"].score == pytest.approx(0.90)
    assert lines["b#0"].score == pytest.approx(0.825)
    assert sel.explanation.reason == "capability: highest score 0.900 (next: b#0 0.825)"


def test_capability_score_is_multiplied_by_effective_weight() -> None:
    """Doubling b's effective weight makes it 1.65 against 0.90, so it wins; downweighting it
    back below a loses again."""
    pool = scored_pool()
    sel = Selector.of(prefer=["fp16", "batch"], key="k", strategy="capability")
    pool.memory.put("k", "b#0")
    pool.get("b#0").effective_weight = 2.0
    assert ids([pool.select(sel).candidate]) == ["b#0"]
    pool.get("b#0").effective_weight = 0.5
    pool.memory.put("k", "b#0")
    assert ids([pool.select(sel).candidate]) == ["a#0"]


def test_capability_weights_are_configurable() -> None:
    """With all the weight on performance, the faster instance wins regardless of load."""
    only_speed = CapabilityWeights(type=0, capability=0, load=0, performance=1, affinity=0)
    pool = make_pool(
        [
            cand("slow#0", max_concurrency=4, latency_ms=30.0),
            cand("fast#0", max_concurrency=4, in_flight=3, latency_ms=10.0),
        ],
        strategies={S.CAPABILITY: Capability(only_speed)},
        default_strategy=S.CAPABILITY,
    )
    assert ids([pool.select(Selector()).candidate]) == ["fast#0"]
    with pytest.raises(ValueError):
        CapabilityWeights(load=-0.1)


@settings(max_examples=80, deadline=None)
@given(members=st.lists(MEMBER, min_size=1, max_size=30), data=st.data())
def test_capability_index_agrees_with_scoring_every_member(
    members: list[dict[str, object]], data: st.DataObject
) -> None:
    """The grouped index picks exactly the member that scoring every member ranks first,
    through loads, latencies, weights and eligibility changing under it."""
    pool = make_pool(
        Candidate(
            f"e#{i}",
            "e",
            "onnx",
            capabilities=m["caps"],  # type: ignore[arg-type]
            effective_weight=m["weight"],  # type: ignore[arg-type]
            max_concurrency=m["max"],  # type: ignore[arg-type]
            latency_ms=m["latency"],  # type: ignore[arg-type]
        )
        for i, m in enumerate(members)
    )
    everyone = list(pool)
    strategy = pool.strategies[S.CAPABILITY]
    assert isinstance(strategy, Capability)
    for _ in range(25):
        c = data.draw(st.sampled_from(everyone))
        op = data.draw(st.sampled_from(["load", "latency", "weight", "eligible"]))
        if op == "load":
            c.in_flight = data.draw(st.integers(0, c.max_concurrency))
        elif op == "latency":
            c.latency_ms = data.draw(st.one_of(st.none(), st.integers(1, 60).map(float)))
        elif op == "weight":
            c.effective_weight = data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
        else:
            c.eligible = not c.eligible
        selector = Selector.of(
            prefer=data.draw(st.sampled_from([(), ("fp16",), ("fp16", "fp32")])),
            key=data.draw(st.sampled_from([None, "k1", "k2"])),
            strategy="capability",
        )
        ranked = strategy.rank(pool.candidate_set(selector), selector)
        expected = next((r[0] for r in ranked if not r[0].full), None)
        assert pool.select(selector).candidate is expected


# --- affinity -------------------------------------------------------------------------------


def test_affinity_sticks_to_the_same_instance() -> None:
    """Every request with the same key goes to the same instance while it stays eligible."""
    pool = make_pool(cand(f"a#{k}", max_concurrency=4) for k in range(30))
    first = pick(pool, S.AFFINITY, key="user-1")
    assert first is not None
    first.in_flight = 2  # load alone does not move a key
    assert all(pick(pool, S.AFFINITY, key="user-1") is first for _ in range(20))


def test_affinity_falls_back_when_ineligible_and_re_sticks() -> None:
    """When the home is isolated the key moves and sticks to its new instance, and stays
    there after the old home is restored."""
    pool = make_pool(cand(f"a#{k}") for k in range(5))
    home = pick(pool, S.AFFINITY, key="k")
    assert home is not None
    home.eligible = False
    moved = pick(pool, S.AFFINITY, key="k")
    assert moved is not None and moved is not home
    assert pick(pool, S.AFFINITY, key="k") is moved
    home.eligible = True
    assert pick(pool, S.AFFINITY, key="k") is moved


def test_affinity_overflows_when_full_without_moving_the_key() -> None:
    """A full home sends that one request elsewhere; the key stays home once it frees up."""
    pool = make_pool(cand(f"a#{k}") for k in range(5))
    home = pick(pool, S.AFFINITY, key="k")
    assert home is not None
    home.in_flight = 1
    other = pick(pool, S.AFFINITY, key="k")
    assert other is not None and other is not home
    home.in_flight = 0
    assert pick(pool, S.AFFINITY, key="k") is home


def test_affinity_homes_expire_on_the_injected_clock() -> None:
    """A key unused past the TTL forgets its home and is placed afresh."""
    clock = FakeClock()
    homes = KeyMemory(ttl=60.0, clock=clock)
    strategy = Affinity(LeastLoaded(random.Random(0)), homes=homes)
    pool = make_pool(
        (cand(f"a#{k}") for k in range(3)),
        strategies={S.AFFINITY: strategy},
        default_strategy=S.AFFINITY,
    )
    home = pool.select(Selector(key="k")).candidate
    assert home is not None and homes.get("k") == home.id
    clock.now += 61
    assert homes.get("k") is None


# --- consistent hash ------------------------------------------------------------------------


def test_consistent_hash_moves_only_the_keys_of_a_leaving_instance() -> None:
    """Removing one instance remaps exactly its keys; the rest keep their instance, and
    bringing it back restores the original mapping."""
    pool = make_pool(cand(f"a#{k}", max_concurrency=10**6) for k in range(20))
    keys = [f"key-{k}" for k in range(2000)]

    def mapping() -> dict[str, str | None]:
        return {k: ids([pick(pool, S.CONSISTENT_HASH, key=k)])[0] for k in keys}

    before = mapping()
    assert len(set(before.values())) == 20  # every instance owns some keys
    pool.get("a#7").eligible = False
    after = mapping()
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == "a#7"}
    pool.get("a#7").eligible = True
    assert mapping() == before


def test_consistent_hash_bounds_the_load_of_a_hot_key() -> None:
    """A hot key fills its instance only up to (1 + epsilon) x the average, then the next
    instance on the ring takes the overflow, and no pick ever exceeds the bound."""
    pool = make_pool(cand(f"a#{k}", max_concurrency=1000) for k in range(10))
    strategy = pool.strategies[S.CONSISTENT_HASH]
    assert isinstance(strategy, ConsistentHash)
    s = pool.candidate_set(Selector())
    home = pick(pool, S.CONSISTENT_HASH, key="hot")
    assert home is not None
    for _ in range(200):
        bound = strategy.bound(s)
        c = pick(pool, S.CONSISTENT_HASH, key="hot")
        assert c is not None and c.in_flight < bound
        c.in_flight += 1
    assert home.in_flight <= strategy.bound(s)
    assert max(c.in_flight for c in pool) <= (1.25 * 200 / 10) + 1
    assert len([c for c in pool if c.in_flight > 0]) >= 8


def test_key_strategies_without_a_key_fall_back() -> None:
    """affinity and consistent_hash without a key behave like least_loaded."""
    pool = make_pool([cand("a#0", in_flight=1, max_concurrency=2), cand("b#0", max_concurrency=2)])
    assert ids([pick(pool, S.AFFINITY), pick(pool, S.CONSISTENT_HASH)]) == ["b#0", "b#0"]


# --- downweighting acts under every strategy (issue 10.8) -----------------------------------

SHARES = st.sampled_from([1.0, 1.0, 0.5, 0.25, 0.125])


def downweighted_pool(shares: list[float], seed: int) -> CandidatePool:
    """Members at configured weight 1, downweighted to `shares`, never full."""
    return make_pool(
        (
            cand(f"e{k}#0", weight=1.0, effective_weight=w, max_concurrency=10**6)
            for k, w in enumerate(shares)
        ),
        seed=seed,
    )


def picked_shares(picks: Iterable[Candidate | None]) -> Counter[str]:
    return Counter(c.id for c in picks if c is not None)


def assert_proportional(got: Counter[str], shares: list[float], tolerance: float) -> None:
    """Each member's share of the picks is its share of the total weight, within `tolerance`
    (absolute, on shares between 0 and 1; a float's last bit is no excess: weights quantized
    to 1/100 can land exactly on the tolerance, 25:12:12 for 2:1:1 gives 0.51 for 0.5)."""
    n = sum(got.values())
    total = sum(shares)
    for k, w in enumerate(shares):
        want = w / total
        assert abs(got[f"e{k}#0"] / n - want) <= tolerance + 1e-9, (k, shares, got)


@settings(max_examples=40, deadline=None)
@given(
    shares=st.lists(SHARES, min_size=2, max_size=12),
    name=st.sampled_from([S.ROUND_ROBIN, S.WEIGHTED_ROUND_ROBIN, S.LEAST_LOADED]),
)
def test_deterministic_strategies_pick_in_proportion_to_effective_weight(
    shares: list[float], name: StrategyName
) -> None:
    """round_robin (turns in proportion to effective over configured weight), smooth weighted
    round robin and least_loaded (earliest deadline among equal loads) give each member its
    share of the effective weight: a ×0.25 member no longer gets a full share."""
    pool = downweighted_pool(shares, seed=1)
    n = 400 * len(shares)
    got = picked_shares(pick(pool, name) for _ in range(n))
    assert_proportional(got, shares, tolerance=0.01)


@settings(max_examples=25, deadline=None)
@given(shares=st.lists(SHARES, min_size=20, max_size=40), seed=st.integers(0, 1000))
def test_random_strategies_pick_in_proportion_to_effective_weight(
    shares: list[float], seed: int
) -> None:
    """weighted_random and least_loaded above 16 members (two choices drawn by weight) give
    each member its share of the effective weight, statistically."""
    for name in (S.WEIGHTED_RANDOM, S.LEAST_LOADED):
        pool = downweighted_pool(shares, seed)
        got = picked_shares(pick(pool, name) for _ in range(20_000))
        assert_proportional(got, shares, tolerance=0.012)


@settings(max_examples=25, deadline=None)
@given(shares=st.lists(SHARES, min_size=2, max_size=10), seed=st.integers(0, 1000))
def test_least_loaded_under_load_keeps_in_flight_proportional_to_weight(
    shares: list[float], seed: int
) -> None:
    """With requests held (each finishes after the next 20 × members picks), least_loaded
    keeps every member's picks in proportion to its effective weight."""
    pool = downweighted_pool(shares, seed)
    held: list[Candidate] = []
    picks: list[Candidate | None] = []
    for _ in range(300 * len(shares)):
        c = pick(pool, S.LEAST_LOADED)
        assert c is not None
        picks.append(c)
        c.in_flight += 1
        held.append(c)
        if len(held) > 20 * len(shares):
            held.pop(0).in_flight -= 1
    assert_proportional(picked_shares(picks), shares, tolerance=0.03)


@settings(max_examples=25, deadline=None)
@given(shares=st.lists(SHARES, min_size=2, max_size=10), seed=st.integers(0, 1000))
def test_affinity_keys_follow_effective_weight(shares: list[float], seed: int) -> None:
    """Keys homed while every member was at full weight: once some are downweighted, a home
    keeps its keys' requests in proportion to its share and the rest overflow by weight, so
    each member's share of the picks is its share of the effective weight."""
    pool = downweighted_pool([1.0] * len(shares), seed)
    keys = [f"user-{k}" for k in range(50 * len(shares))]
    homes = Counter(ids(pick(pool, S.AFFINITY, key=k) for k in keys))
    assert len(homes) == len(shares)  # least_loaded homed the keys evenly
    for k, w in enumerate(shares):
        pool.get(f"e{k}#0").effective_weight = w
    got = picked_shares(pick(pool, S.AFFINITY, key=k) for _ in range(8) for k in keys)
    assert_proportional(got, shares, tolerance=0.03)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(2, 12),
    share=st.sampled_from([0.5, 0.25, 0.125]),
    victim=st.integers(0, 11),
    seed=st.integers(0, 1000),
)
def test_consistent_hash_downweighted_instance_takes_its_share_of_its_keys(
    n: int, share: float, victim: int, seed: int
) -> None:
    """A downweighted instance takes its share of the requests whose keys land on it (the
    others go on to the next instance on the ring): its picks shrink by its share."""
    pool = downweighted_pool([1.0] * n, seed)
    keys = [f"key-{k}" for k in range(300 * n)]
    target = f"e{victim % n}#0"

    def share_of_target() -> float:
        got = picked_shares(pick(pool, S.CONSISTENT_HASH, key=k) for k in keys)
        return got[target] / len(keys)

    full = share_of_target()
    pool.get(target).effective_weight = share
    assert abs(share_of_target() - full * share) <= 0.01


def test_capability_score_leaves_a_downweighted_instance_the_least() -> None:
    """The scored strategy multiplies by the effective weight: between otherwise equal
    members, a downweighted one is picked only when the others are full."""
    pool = downweighted_pool([1.0, 0.25, 1.0], seed=0)
    assert "e1#0" not in ids(pick(pool, S.CAPABILITY) for _ in range(50))


def test_round_robin_at_full_weight_is_plain_round_robin() -> None:
    """Members at full weight (whatever their configured weights) take every turn in order,
    as round robin always did; one at 0.25 takes one turn in four."""
    pool = make_pool(cand(f"a#{k}", weight=1.0 + k, max_concurrency=8) for k in range(3))
    assert ids(pick(pool, S.ROUND_ROBIN) for _ in range(6)) == ["a#0", "a#1", "a#2"] * 2
    pool.get("a#1").effective_weight = 0.5  # configured 2: a quarter of its turns
    got = Counter(ids(pick(pool, S.ROUND_ROBIN) for _ in range(90)))
    assert got == {"a#0": 40, "a#1": 10, "a#2": 40}


# --- explain --------------------------------------------------------------------------------


def test_explain_lists_every_instance_its_exclusion_and_the_winner() -> None:
    """--explain shows each instance with the filter that excluded it or the strategy's note,
    and says why the winner won."""
    pool = fleet()
    pool.get("web#1").ineligible_reason = "isolated: 5 errors"
    pool.get("web#1").eligible = False
    pool.get("web#0").in_flight = 1
    pool.add(cand("api#1", "http", capabilities={"fp32"}, labels={"tier": "gold"}))
    sel = pool.select(
        Selector.of(type="http", labels=["tier=gold"], strategy="least_loaded"), explain=True
    )
    assert sel.explanation is not None
    e = sel.explanation
    assert e.winner == "api#1" and e.outcome is Outcome.PICKED
    assert e.reason == "least_loaded: least loaded of 1 free members (in flight 0/1)"
    got = {a.instance: (a.excluded_by, a.note) for a in e.candidates}
    assert got == {
        "echo#0": (FilterName.TYPE, "type echo"),
        "web#0": (None, "in flight 1/1 (full)"),
        "web#1": (FilterName.ELIGIBILITY, "isolated: 5 errors"),
        "api#0": (FilterName.LABEL, "lacks label tier=gold"),
        "api#1": (None, "in flight 0/1"),
    }
    assert e.to_json()["candidates"][0]["excluded_by"] == "type"


@pytest.mark.parametrize("name", list(S))
def test_every_strategy_explains_its_pick(name: StrategyName) -> None:
    """Each strategy's explanation names the winner, gives a reason and a note per member."""
    pool = make_pool(cand(f"a#{k}", max_concurrency=2, latency_ms=float(k + 1)) for k in range(4))
    sel = pool.select(Selector.of(key="k", strategy=name.value), explain=True)
    assert sel.explanation is not None and sel.candidate is not None
    assert sel.explanation.winner == sel.candidate.id
    assert sel.explanation.reason.startswith(f"{name.value}: ")
    assert all(a.note for a in sel.explanation.candidates)


@pytest.mark.parametrize("name", list(S))
def test_explain_when_everything_is_full(name: StrategyName) -> None:
    """With every match full, the explanation says so, names no winner and notes each load."""
    pool = make_pool(cand(f"a#{k}", in_flight=1) for k in range(3))
    pick(pool, S.CONSISTENT_HASH, key="k")  # an earlier pick must not leak into this one
    sel = pool.select(Selector.of(key="k", strategy=name.value), explain=True)
    assert sel.outcome is Outcome.ALL_FULL and sel.explanation is not None
    assert sel.explanation.winner is None
    assert sel.explanation.reason == "all 3 instances are full (in flight 3/3)"
    assert all("in flight 1/1" in a.note for a in sel.explanation.candidates)
    assert not any("hashes here" in a.note for a in sel.explanation.candidates)


def test_explain_an_explicit_instance() -> None:
    """An explicit instance is explained as asked for, every other instance as excluded."""
    pool = fleet()
    sel = pool.select(Selector.of(instance="api#0"), explain=True)
    assert sel.explanation is not None
    assert sel.explanation.reason == "instance api#0 asked for explicitly"
    lines = {a.instance: a for a in sel.explanation.candidates}
    assert lines["api#0"].excluded_by is None and lines["api#0"].note.startswith("asked for")
    assert lines["web#0"].excluded_by is FilterName.INSTANCE
    one = make_pool([cand("solo#0", in_flight=1)])
    assert one.select(Selector()).message == "the one instance is full (in flight 1/1)"


def test_default_strategies_cover_every_name() -> None:
    """The default registry has one strategy per name, each reporting its own name."""
    strategies = default_strategies(rng=random.Random(0))
    assert set(strategies) == set(S)
    assert all(s.name is n for n, s in strategies.items())


def test_a_reused_selection_states_the_current_pick() -> None:
    """Plain picks may share one Selection object; its strategy and match count stay right."""
    a = cand("a#0", max_concurrency=8)
    pool = make_pool([a])
    first = pool.select(Selector.of(type="onnx"))
    again = pool.select(Selector.of(type="onnx"))
    assert again == first
    assert (again.outcome, again.candidate, again.matched) == (Outcome.PICKED, a, 1)
    assert pool.select(Selector.of(type="onnx", strategy="round_robin")).strategy is S.ROUND_ROBIN
    pool.add(cand("b#0", max_concurrency=8))
    a.in_flight = 0
    picks = [pool.select(Selector.of(type="onnx")) for _ in range(4)]
    assert all(p.matched == 2 and p.strategy is S.LEAST_LOADED for p in picks)
    explained = pool.select(Selector.of(type="onnx"), explain=True)
    assert explained.explanation is not None
    assert pool.select(Selector.of(type="onnx")).explanation is None
