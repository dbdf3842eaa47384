"""The budget of pipe bytes the daemon may add for large frames (plain values, no pipes)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from engctl.daemon.pipes import PipeBudget

KIB = 1024


def test_a_frame_that_fits_asks_for_nothing() -> None:
    budget = PipeBudget(total=1024 * KIB, largest=1024 * KIB)
    assert budget.size_for(64 * KIB, 64 * KIB) is None
    assert budget.size_for(64 * KIB, 1000) is None


def test_a_larger_frame_asks_for_the_next_power_of_two_up_to_the_largest() -> None:
    budget = PipeBudget(total=8 * 1024 * KIB, largest=1024 * KIB)
    assert budget.size_for(64 * KIB, 118 * KIB) == 128 * KIB
    assert budget.size_for(64 * KIB, 128 * KIB + 1) == 256 * KIB
    assert budget.size_for(64 * KIB, 5 * 1024 * KIB) == 1024 * KIB  # as few pieces as may be
    assert budget.size_for(1024 * KIB, 5 * 1024 * KIB) is None  # as large as it may be


def test_a_spent_budget_refused_growth_and_gives_it_back_when_pipes_close() -> None:
    budget = PipeBudget(total=256 * KIB, largest=1024 * KIB)
    assert budget.size_for(64 * KIB, 200 * KIB) == 256 * KIB
    budget.took(64 * KIB, 256 * KIB)
    assert budget.size_for(64 * KIB, 200 * KIB) is None  # 192 more would pass 256
    assert budget.size_for(64 * KIB, 100 * KIB) == 128 * KIB  # 64 more would not
    budget.gave_back(192 * KIB)
    assert budget.size_for(64 * KIB, 200 * KIB) == 256 * KIB


def test_after_the_kernel_refuses_nothing_more_is_asked() -> None:
    """EPERM: the user is over its pipe allowance; asking on every large frame would cost a
    syscall each and never succeed."""
    budget = PipeBudget(total=4096 * KIB, largest=1024 * KIB)
    budget.took(64 * KIB, 128 * KIB)
    budget.refused()
    assert budget.size_for(64 * KIB, 200 * KIB) is None
    budget.gave_back(64 * KIB)
    assert budget.size_for(64 * KIB, 100 * KIB) == 128 * KIB


def test_of_this_user_is_a_quarter_of_the_soft_allowance() -> None:
    with open("/proc/sys/fs/pipe-user-pages-soft", "rb") as f:
        soft = int(f.read())
    budget = PipeBudget.of_this_user()
    page = os.sysconf("SC_PAGE_SIZE")
    assert budget.total == (soft * page // 4 if soft else 64 * 1024 * KIB)
    assert budget.largest >= 64 * KIB


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 3 * 1024 * KIB)), max_size=40))
def test_what_is_taken_never_passes_the_budget(asks: list[tuple[int, int]]) -> None:
    budget = PipeBudget(total=1024 * KIB, largest=1024 * KIB)
    pipes = [64 * KIB] * 4
    for k, frame in asks:
        wanted = budget.size_for(pipes[k], frame)
        if wanted is not None:
            assert wanted > pipes[k] and wanted <= budget.largest
            budget.took(pipes[k], wanted)
            pipes[k] = wanted
        assert budget.used <= budget.total
        assert budget.used == sum(p - 64 * KIB for p in pipes)
