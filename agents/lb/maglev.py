"""The consistent table of a service (Maglev, as Katran and Cilium build it): pure.

A flow's bucket is `jhash(saddr . sport, seed) mod M` in the kernel; the table says which
backend each of the M buckets goes to. Every LB node builds it from the same backend list
and seed, so both nodes pick the same backend for a flow, and removing one backend moves
its own buckets and only a small share of the others'.

- Each backend gets a permutation of the buckets, `offset + j * skip mod M`, from a keyed
  hash of its name (its instance id: stable while its address may be reused) and the seed.
- The backends take turns, in the order of the list, each taking the next free bucket of
  its permutation, until every bucket is taken: each ends with M/N buckets, give or take one.

M is prime (so that every skip walks all buckets) and at least 100 x N. It comes from a
fixed ladder, not from N itself: a bucket count that changed with every backend added or
removed would remap nearly every flow, since `jhash mod M` changes with M. The first rung,
65537 (Katran's default), also keeps the flows moved by a removal far below 2 % for small
N, where a table of 100 x N buckets moves several percent (measured: tests/test_lb_maglev.py).
Crossing a rung (more than 655 backends) remaps most flows, once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

# Primes, each the first one above 65537 * 2^k.
LADDER = (65537, 131101, 262151, 524309, 1048601)
MIN_SPREAD = 100  # buckets per backend, at least


def table_size(backends: int) -> int:
    """M for a table of ``backends`` (ValueError past the ladder's top)."""
    for size in LADDER:
        if size >= MIN_SPREAD * backends:
            return size
    raise ValueError(f"{backends} backends: at most {LADDER[-1] // MIN_SPREAD} per table")


def permutation(name: str, seed: int, size: int) -> tuple[int, int]:
    """(offset, skip) of a backend's walk over the buckets."""
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=seed.to_bytes(4, "big")).digest()
    return (int.from_bytes(digest[:8], "big") % size,
            int.from_bytes(digest[8:], "big") % (size - 1) + 1)


def build(names: Sequence[str], seed: int, size: int | None = None) -> list[int]:
    """The table: for each bucket, the index in ``names`` of its backend ([] for none).

    ``names`` must hold no duplicate; its order matters (both nodes get it sorted).
    """
    n = len(names)
    if n == 0:
        return []
    if len(set(names)) != n:
        raise ValueError("duplicate backend names")
    m = table_size(n) if size is None else size
    walks = [permutation(name, seed, m) for name in names]
    at = [offset for offset, _skip in walks]
    skips = [skip for _offset, skip in walks]
    taken = bytearray(m)
    table = [0] * m
    filled = 0
    turns = range(n)
    # The hot loop of the build (about M ln M probes): locals only, no function calls.
    while True:
        for i in turns:
            c = at[i]
            if taken[c]:
                skip = skips[i]
                c += skip
                if c >= m:
                    c -= m
                while taken[c]:
                    c += skip
                    if c >= m:
                        c -= m
            taken[c] = 1
            table[c] = i
            at[i] = c
            filled += 1
            if filled == m:
                return table


def moved(before: Sequence[str], after: Sequence[str], gone: str | None = None) -> float:
    """The share of all buckets whose backend changed, not counting those of ``gone``."""
    if len(before) != len(after) or not before:
        raise ValueError("tables of different sizes")
    changed = sum(1 for b, a in zip(before, after, strict=True) if b != a and b != gone)
    return changed / len(before)
