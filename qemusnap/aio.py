"""asyncio helpers shared by the adapters and the engine: deadlines that raise qemusnap's own
timeout error, and cleanup that a second cancellation cannot cut short."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from .errors import OperationTimeout

log = logging.getLogger("qemusnap")

_T = TypeVar("_T")


@contextlib.asynccontextmanager
async def deadline(timeout: float | None, what: str) -> AsyncIterator[None]:
    """Bound the block by ``timeout`` seconds (None: no bound); expiry -> OperationTimeout."""
    try:
        async with asyncio.timeout(timeout) as scope:
            yield
    except TimeoutError:
        # Only our own expiry is translated; an inner OperationTimeout passes through as is.
        if scope.expired():
            raise OperationTimeout(f"{what} did not finish within {timeout:g} s") from None
        raise


async def shielded(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile.

    Cleanup (cancelling a job, thawing a guest, reverting to a snapshot) must not be cut short
    by a second cancellation; ``coro`` bounds itself with its own deadline instead.  If the
    caller was cancelled, CancelledError is raised once ``coro`` has finished.
    """
    task = asyncio.ensure_future(coro)
    interrupted = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            interrupted = True
    if interrupted:
        if not task.cancelled() and task.exception() is not None:
            log.warning("cleanup failed while cancelled: %s", task.exception())
        raise asyncio.CancelledError
    return task.result()
