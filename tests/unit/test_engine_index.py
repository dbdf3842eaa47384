"""The registry's indexes by type and label behind `list`/`status --type/--label` (issue
10.20, seed 003): lookups agree with a scan of the specs through adds, updates and removals."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engctl.daemon.instance import EngineIndex
from engctl.models import EngineSpec

SPEC = st.builds(
    lambda name, type_, labels: EngineSpec(name, ("x",), type=type_, labels=labels),
    st.sampled_from(["a", "b", "c", "d"]),
    st.sampled_from(["http", "sql", "generic"]),
    st.dictionaries(st.sampled_from(["tier", "team"]), st.sampled_from(["gold", "x"])),
)
QUERY = st.tuples(
    st.sampled_from([None, "http", "sql", "generic", "nope"]),
    st.lists(st.tuples(st.sampled_from(["tier", "team"]), st.sampled_from(["gold", "x"]))),
)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), SPEC), max_size=30), query=QUERY)
def test_index_lookups_agree_with_a_scan(
    ops: list[tuple[bool, EngineSpec]], query: tuple[str | None, list[tuple[str, str]]]
) -> None:
    """Register (or update) and unregister in any order: `find` is exactly the engines whose
    type and labels match, and None when nothing filters."""
    index = EngineIndex()
    live: dict[str, EngineSpec] = {}
    for add, spec in ops:
        old = live.get(spec.name)
        if add:
            if old is None:
                index.add(spec)
            else:
                index.replace(old, spec)
            live[spec.name] = spec
        elif old is not None:
            index.remove(old)
            del live[spec.name]
    type_, labels = query
    found = index.find(type_, labels)
    if type_ is None and not labels:
        assert found is None
        return
    expected = {
        n
        for n, s in live.items()
        if (type_ is None or s.type == type_) and all(s.labels.get(k) == v for k, v in labels)
    }
    assert found == expected
