"""The agent's per-entity locks: exclusive per key, and forgotten once nobody uses them."""

import asyncio

import pytest

from agents.runtime import KeyedLocks


async def test_one_holder_per_key_and_nothing_kept_afterwards() -> None:
    locks = KeyedLocks()
    inside: dict[str, int] = {}
    most: dict[str, int] = {}

    async def work(n: int) -> None:
        key = f"i{n % 3}"
        # Staggered: some arrive while others wait, some after a holder let go.
        await asyncio.sleep(n * 0.0003)
        async with locks(key):
            inside[key] = inside.get(key, 0) + 1
            most[key] = max(most.get(key, 0), inside[key])
            await asyncio.sleep(0.002)
            inside[key] -= 1

    await asyncio.gather(*(work(n) for n in range(200)))
    assert most == {f"i{n}": 1 for n in range(3)}
    assert len(locks) == 0


async def test_a_waiter_keeps_the_lock_alive_and_a_failure_releases_it() -> None:
    locks = KeyedLocks()
    held = asyncio.Event()
    release = asyncio.Event()
    order: list[str] = []

    async def first() -> None:
        async with locks("i1"):
            held.set()
            await release.wait()
            order.append("first")
            raise RuntimeError("apply failed")

    async def second() -> None:
        await held.wait()
        async with locks("i1"):
            order.append("second")

    a, b = asyncio.create_task(first()), asyncio.create_task(second())
    await held.wait()
    await asyncio.sleep(0)
    assert len(locks) == 1
    release.set()
    with pytest.raises(RuntimeError):
        await a
    await b
    assert order == ["first", "second"]
    assert len(locks) == 0
