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

The fill is about M ln M probes: 0.2-0.4 s in Python for 1,000 backends (M = 131,101), a
few ms in C. So the same loop in C (`maglev_fill.c`) is built with the system's compiler
at first use, into ``$XDG_CACHE_HOME/orch`` (or ``~/.cache/orch``), and loaded with
ctypes; without a compiler the Python loop runs. Both give the same table (tested).
"""

from __future__ import annotations

import array
import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

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


def build(names: Sequence[str], seed: int, size: int | None = None, *,
          native: bool = True) -> list[int]:
    """The table: for each bucket, the index in ``names`` of its backend ([] for none).

    ``names`` must hold no duplicate; its order matters (both nodes get it sorted).
    ``native``: use the C loop when it can be built (False: the Python loop).
    """
    n = len(names)
    if n == 0:
        return []
    if len(set(names)) != n:
        raise ValueError("duplicate backend names")
    m = table_size(n) if size is None else size
    walks = [permutation(name, seed, m) for name in names]
    offsets = [offset for offset, _skip in walks]
    skips = [skip for _offset, skip in walks]
    fill = native_fill() if native else None
    if fill is not None:
        return fill(n, m, offsets, skips)
    return _fill(n, m, offsets, skips)


def _fill(n: int, m: int, offsets: list[int], skips: list[int]) -> list[int]:
    at = list(offsets)
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


Fill = Callable[[int, int, list[int], list[int]], list[int]]
_native: list[Fill | None] = []  # loaded once: [fill] or [None]
_native_lock = threading.Lock()


def native_fill() -> Fill | None:
    """The C fill, built and loaded at first call; None without a C compiler."""
    with _native_lock:
        if not _native:
            _native.append(_load())
        return _native[0]


def _load() -> Fill | None:
    source = Path(__file__).with_name("maglev_fill.c")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "orch"
    library = cache / f"maglev_fill-{digest}.so"
    if not library.exists():
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            return None
        cache.mkdir(parents=True, exist_ok=True)
        scratch = library.with_name(f".{library.name}.{os.getpid()}")
        done = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(scratch),
                               str(source)], capture_output=True, timeout=120)
        if done.returncode != 0:
            return None
        scratch.replace(library)  # atomic: another process may be building it too
    try:
        function = ctypes.CDLL(str(library)).maglev_fill
    except (OSError, AttributeError):  # a broken cache entry: the Python loop will do
        return None
    u32p = ctypes.POINTER(ctypes.c_uint32)
    function.argtypes = [ctypes.c_uint32, ctypes.c_uint32, u32p, u32p, u32p]
    function.restype = ctypes.c_int

    def fill(n: int, m: int, offsets: list[int], skips: list[int]) -> list[int]:
        table = array.array("I", bytes(4 * m))
        c_offsets = (ctypes.c_uint32 * n)(*offsets)
        c_skips = (ctypes.c_uint32 * n)(*skips)
        if function(n, m, c_offsets, c_skips, (ctypes.c_uint32 * m).from_buffer(table)):
            raise MemoryError("maglev_fill: out of memory")
        return table.tolist()

    return fill


def moved(before: Sequence[str], after: Sequence[str], gone: str | None = None) -> float:
    """The share of all buckets whose backend changed, not counting those of ``gone``."""
    if len(before) != len(after) or not before:
        raise ValueError("tables of different sizes")
    changed = sum(1 for b, a in zip(before, after, strict=True) if b != a and b != gone)
    return changed / len(before)
