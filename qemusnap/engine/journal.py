"""The operation frame: the VM's lock, the journal, and recovery dispatched to the rooms.

Every mutating operation takes the VM's cross-process lock (:func:`operation`), first repairs
what an interrupted earlier operation left (the journal), and journals itself
(:func:`journaled`) before its first irreversible step.  An operation that fails is rolled back
by the very code that repairs a crashed one, so both paths stay honest.

That code lives next to each operation, in its room: a room declares, with
``@recovers("operation-name")``, how an entry of that name is finished or rolled back from its
journal data (in the spirit of QEMU's ``JobDriver``: the framework runs the job, the driver
knows what it does).  The framework here knows no operation: it stops what the dead process
left running inside QEMU, calls the declared recovery, resumes a VM the operation had paused,
and ends the entry.  Adding an operation never edits this file.

The journal format (operation names, data keys) is the one the single-module engine wrote, so
entries an older qemusnap left still recover.  One key means the same for every operation:
``outcome``, set by a recovery, is what the user must be told about the state it left (added
to the failing operation's error by a rollback, logged as an error by a later command's
repair).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..aio import deadline
from ..errors import CommandError, OperationError
from ..faults import crashpoint
from ..memory import cancel_migration
from ..store import Store, VMLock
from .context import DEFAULT_TIMEOUT, RECOVERY_TIMEOUT, Context, log
from .shared import repause_after_save


class Journal:
    """The journal entry of the operation in progress: grows before each irreversible step."""

    def __init__(
        self, store: Store, vm_id: int, operation: str, data: dict[str, Any], *, id: int = 0
    ) -> None:
        self._store = store
        self.operation = operation
        self.data = data
        if id:  # an entry an interrupted run left: recovery goes on updating it
            self.id = id
            return
        self.id = store.journal_begin(vm_id, operation, data)
        self.passed("journaled")

    def update(self, **data: Any) -> None:
        self.data.update(data)
        self._store.journal_update(self.id, **data)

    def passed(self, step: str) -> None:
        """A step is done (a crash point for the reliability tests)."""
        crashpoint(self.operation, step)


#: How one operation's journal entry is finished or rolled back: gets the context, the entry's
#: data and the entry itself (to record progress a recovery interrupted in turn must find).
Recovery = Callable[[Context, dict[str, Any], Journal], Awaitable[None]]

_recoveries: dict[str, Recovery] = {}


def recovers(*operations: str) -> Callable[[Recovery], Recovery]:
    """Declare the recovery of the journal entries named ``operations`` (a decorator)."""

    def register(recovery: Recovery) -> Recovery:
        for operation in operations:
            if operation in _recoveries:
                raise RuntimeError(f"two recoveries declared for journal entry {operation!r}")
            _recoveries[operation] = recovery
        return recovery

    return register


def recovery_for(operation: str) -> Recovery:
    """The declared recovery of ``operation`` entries (every room is imported by the facade)."""
    try:
        return _recoveries[operation]
    except KeyError:
        raise OperationError(
            f"the journal holds an unfinished {operation!r}, which this qemusnap does not know"
            " how to repair (written by another version?)"
        ) from None


def declared_operations() -> list[str]:
    return sorted(_recoveries)


@contextlib.asynccontextmanager
async def operation(ctx: Context, what: str) -> AsyncIterator[None]:
    """Hold the VM's lock for one operation (waiting up to ``lock_timeout``)."""
    lock = VMLock(ctx.store.lock_path(ctx.record.id), what)
    until = asyncio.get_running_loop().time() + ctx.lock_timeout
    while not lock.try_acquire():
        if asyncio.get_running_loop().time() > until:
            raise lock.busy_error()
        await asyncio.sleep(0.1)
    try:
        await recover_pending(ctx)
        yield
    finally:
        lock.release()
        ctx.record = ctx.store.vm(ctx.record.id)


@contextlib.asynccontextmanager
async def journaled(ctx: Context, operation: str, **data: Any) -> AsyncIterator[Journal]:
    """Journal one operation.  If it fails, roll it back with the recovery code (shielded,
    with its own deadline) and only then drop the entry; a failed rollback keeps it for the
    next command."""
    entry = Journal(ctx.store, ctx.record.id, operation, data)
    try:
        yield entry
    except BaseException as exc:
        try:
            await asyncio.shield(_rollback(ctx, operation, entry))
        except Exception as undo:
            exc.add_note(f"rollback failed, `qemusnap recover` will retry: {undo}")
            log.warning("rollback of %s failed: %s", operation, undo)
        else:
            if entry.data.get("outcome"):
                exc.add_note(str(entry.data["outcome"]))
        raise
    ctx.store.journal_end(entry.id)


async def _rollback(ctx: Context, operation: str, entry: Journal) -> None:
    async with asyncio.timeout(RECOVERY_TIMEOUT):
        await recover_entry(ctx, operation, entry.data, entry)
    ctx.store.journal_end(entry.id)


async def recover_pending(ctx: Context) -> None:
    """Repair what an interrupted operation left behind."""
    for entry in ctx.store.journal(ctx.record.id):
        log.warning("repairing interrupted %s of %s", entry.operation, entry.data.get("name"))
        async with asyncio.timeout(RECOVERY_TIMEOUT):
            journal = Journal(ctx.store, ctx.record.id, entry.operation, entry.data, id=entry.id)
            await recover_entry(ctx, entry.operation, entry.data, journal)
        ctx.store.journal_end(entry.id)
        if entry.data.get("outcome"):
            log.error("%s", entry.data["outcome"])


async def recover(ctx: Context, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Finish or roll back whatever an interrupted qemusnap left (also done by every
    operation before it starts)."""
    async with deadline(timeout, "recover"), operation(ctx, "recover"):
        pass


async def recover_entry(
    ctx: Context, operation: str, data: dict[str, Any], journal: Journal
) -> None:
    """Bring VM, images and store back to a consistent state after ``operation`` stopped
    part-way: a snapshot is complete and listed, or absent with its files removed."""
    recovery = recovery_for(operation)
    if ctx.monitor is not None:
        await stop_leftovers(ctx)
    await recovery(ctx, data, journal)
    if data.get("paused_by_us") and ctx.monitor is not None:
        status = await ctx.monitor.query_status()
        if status.status in ("paused", "postmigrate"):
            await ctx.monitor.cont()


async def stop_leftovers(ctx: Context) -> None:
    """Stop what the interrupted process left running inside QEMU before repairing:
    QEMU goes on with a migration or a job when its client dies.

    Its migration is cancelled; one that completed left QEMU in "postmigrate", with its
    images inactivated (no block job, no snapshot works on them): ``cont`` + ``stop``
    makes them usable, the VM paused.  Its block jobs are cancelled (a commit or stream
    cancelled half-way leaves every image reading the same data; the step is run again).
    Its other jobs (``snapshot-save``/``-load``/``-delete``, not cancellable half-way) are
    waited for, so that no snapshot tag appears after the repair, and dismissed."""
    monitor = ctx.monitor
    assert monitor is not None
    await cancel_migration(monitor)
    for job in await monitor.execute("query-block-jobs"):
        if str(job.get("device", "")).startswith("qemusnap-"):
            with contextlib.suppress(CommandError):
                await monitor.execute("block-job-cancel", {"device": job["device"], "force": True})
    while True:
        ours = [
            job
            for job in await monitor.execute("query-jobs")
            if str(job.get("id", "")).startswith("qemusnap-")
        ]
        for job in ours:
            if job.get("status") == "concluded":
                with contextlib.suppress(CommandError):
                    await monitor.execute("job-dismiss", {"id": job["id"]})
        if all(job.get("status") in ("concluded", "null") for job in ours):
            break
        await asyncio.sleep(0.05)
    await monitor.wait_status_not("finish-migrate", timeout=30.0)
    await repause_after_save(ctx)
