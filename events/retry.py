"""Retrying a call with backoff while its failures are worth another try."""

from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, retry_if_exception
from tenacity.stop import stop_base
from tenacity.wait import wait_base

T = TypeVar("T")


async def retried(call: Callable[[], Awaitable[T]], *, transient: Callable[[BaseException], bool],
                  stop: stop_base, wait: wait_base) -> T:
    """``call()``, then again as ``stop`` and ``wait`` say while ``transient(error)``.

    The first try runs bare: building a retry loop costs more than most calls do.
    """
    try:
        return await call()
    except Exception as exc:
        if not transient(exc):
            raise
    async for attempt in AsyncRetrying(retry=retry_if_exception(transient), stop=stop,
                                       wait=wait, reraise=True):
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity reraises")
