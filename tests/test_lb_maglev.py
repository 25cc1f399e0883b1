"""The consistent table (agents.lb.maglev): pure, no kernel.

Balanced, the same on both nodes (same list and seed), different for another seed, and
minimally disrupted: when 1 of N backends leaves, the flows of the others that move stay
at or below 2 % (the figures are printed: `pytest -s`).
"""

from __future__ import annotations

from collections import Counter

import pytest

from agents.lb import maglev


def names(n: int) -> list[str]:
    return sorted(f"web-{i}" for i in range(n))


def backends_of(table: list[int], order: list[str]) -> list[str]:
    return [order[i] for i in table]


def test_sizes_are_primes_of_at_least_100_buckets_per_backend() -> None:
    for size in maglev.LADDER:
        assert all(size % d for d in range(2, int(size ** 0.5) + 1)), size
    assert maglev.table_size(1) == maglev.table_size(655) == 65537
    assert maglev.table_size(656) == 131101
    assert maglev.table_size(1000) >= 100_000
    with pytest.raises(ValueError, match="at most"):
        maglev.table_size(20_000)


@pytest.mark.parametrize("n", [1, 3, 4, 16, 64])
def test_every_backend_gets_its_share_give_or_take_one(n: int) -> None:
    table = maglev.build(names(n), seed=42)
    assert len(table) == maglev.table_size(n)
    counts = Counter(table)
    assert sorted(counts) == list(range(n))
    assert max(counts.values()) - min(counts.values()) <= 1


def test_both_nodes_build_the_same_table_and_the_seed_matters() -> None:
    order = names(16)
    node_a = maglev.build(order, seed=7)
    node_b = maglev.build(list(order), seed=7)
    assert node_a == node_b
    assert maglev.build(order, seed=8) != node_a
    assert maglev.build([], seed=7) == []
    with pytest.raises(ValueError, match="duplicate"):
        maglev.build(["a", "a"], seed=7)


@pytest.mark.parametrize("n", [4, 16, 64])
def test_one_backend_leaving_moves_at_most_2_percent_of_the_other_flows(n: int) -> None:
    order = names(n)
    before = backends_of(maglev.build(order, seed=99), order)
    worst = 0.0
    for gone in order[:: max(1, n // 4)]:
        rest = [b for b in order if b != gone]
        after = backends_of(maglev.build(rest, seed=99), rest)
        share = maglev.moved(before, after, gone)
        worst = max(worst, share)
        # The buckets of the backend that left all went to the others.
        assert gone not in after
    print(f"\nmaglev N={n} M={len(before)}: worst share of other flows moved "
          f"{worst * 100:.2f} %")
    assert worst <= 0.02


def test_a_backend_joining_takes_buckets_mostly_from_the_others_evenly() -> None:
    order = names(8)
    before = backends_of(maglev.build(order, seed=5), order)
    grown = sorted([*order, "web-new"])
    after = backends_of(maglev.build(grown, seed=5), grown)
    changed = sum(1 for b, a in zip(before, after, strict=True) if b != a)
    to_new = sum(1 for b, a in zip(before, after, strict=True) if b != a and a == "web-new")
    # About 1/9 of the buckets go to the new backend; little else moves.
    assert to_new >= len(before) // 9 - 1
    assert changed - to_new <= 0.02 * len(before)


@pytest.mark.parametrize(("n", "seed"), [(1, 0), (3, 1), (16, 2**32 - 1), (200, 12345)])
def test_the_c_loop_builds_exactly_what_the_python_loop_builds(n: int, seed: int) -> None:
    if maglev.native_fill() is None:
        pytest.skip("no C compiler: only the Python loop runs here")
    order = names(n)
    assert maglev.build(order, seed) == maglev.build(order, seed, native=False)
    size = 1009  # any prime will do
    assert maglev.build(order[:5], seed, size) == maglev.build(order[:5], seed, size,
                                                                native=False)
