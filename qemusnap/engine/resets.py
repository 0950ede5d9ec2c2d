"""Resetting a VM to a golden snapshot: the kind of checkpoint that resets fastest, the reset,
and a restore point that undoes a block (see :mod:`qemusnap.harness`, which re-exports them).

They drive any object with the VM's API (:class:`Resettable`, which :class:`qemusnap.VM` is),
so the facade's ``restore_point`` can use them without this module importing the facade.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import attrs

from ..aio import shielded
from ..errors import SnapshotNotFoundError
from ..models import Disk, MemoryKind, Snapshot, SnapshotKind
from ..store import Store, VMRecord
from .context import DEFAULT_TIMEOUT

# Logged under the harness's name, where these helpers lived first.
log = logging.getLogger("qemusnap.harness")


class Resettable(Protocol):
    """What the reset helpers need of a VM (:class:`qemusnap.VM` has it all)."""

    @property
    def store(self) -> Store: ...

    @property
    def record(self) -> VMRecord: ...

    async def disks(self, *, timeout: float = ...) -> list[Disk]: ...

    async def create(
        self, name: str, *, memory_file: str | None = ..., timeout: float = ...
    ) -> Snapshot: ...

    def info(self, name: str) -> Snapshot: ...

    async def revert(self, name: str, *, force: bool = ..., timeout: float = ...) -> Snapshot: ...


#: Reset by ``snapshot-load`` of an internal checkpoint, inside the running QEMU.
IN_PLACE = "in-place snapshot-load"
#: Reset by restarting QEMU from an external checkpoint (``-incoming defer``, memory file).
EXTERNAL_RESTART = "restart from external checkpoint"
#: Reset to a disk-only snapshot: QEMU restarts on the reverted disks, the guest boots afresh.
DISK_ONLY_RESTART = "restart from disk-only snapshot (fresh boot)"


@attrs.frozen
class ResetReport:
    """How a :func:`reset` brought the VM back, and how long the revert took (wall clock)."""

    method: str
    seconds: float


def reset_method(snapshot: Snapshot) -> str:
    """The way :func:`reset` brings a VM back to ``snapshot`` (one of the constants above)."""
    if snapshot.kind is SnapshotKind.INTERNAL and snapshot.memory is MemoryKind.INTERNAL:
        return IN_PLACE
    if snapshot.memory is MemoryKind.NONE:
        return DISK_ONLY_RESTART
    return EXTERNAL_RESTART


def supports_in_place(formats: Sequence[str]) -> bool:
    """Whether disks of these formats (the writable ones) allow an internal checkpoint.

    ``snapshot-save`` needs a qcow2 image for every disk and one of them for the RAM.
    """
    return bool(formats) and all(f == "qcow2" for f in formats)


async def golden(
    vm: Resettable,
    name: str,
    *,
    memory_file: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Snapshot:
    """Take checkpoint ``name`` of a running VM, of the kind that resets fastest.

    An internal checkpoint when every writable disk is qcow2; otherwise an external checkpoint
    with its RAM in ``memory_file`` (default: in the state directory).

    :raise SnapshotExistsError: a snapshot of that name exists already.
    """
    async with asyncio.timeout(timeout):
        disks = [d for d in await vm.disks(timeout=timeout) if not d.read_only]
        if supports_in_place([d.format for d in disks]):
            return await vm.create(name, timeout=timeout)
        if memory_file is None:
            memory_file = str(vm.store.memory_dir(vm.record.id) / f"{name}.mem")
        log.info("%s: not every writable disk is qcow2, taking an external checkpoint", name)
        return await vm.create(name, memory_file=memory_file, timeout=timeout)


async def reset(vm: Resettable, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> ResetReport:
    """Bring the VM back to snapshot ``name`` (normally a :func:`golden` checkpoint).

    Whatever the VM does now is thrown away (a disk-only snapshot restarts QEMU without asking
    for ``force``); a checkpoint comes back in the run state it was taken in.
    """
    method = reset_method(vm.info(name))
    start = time.perf_counter()
    await vm.revert(name, force=True, timeout=timeout)
    return ResetReport(method, time.perf_counter() - start)


@contextlib.asynccontextmanager
async def restore_point(
    vm: Resettable, name: str, *, timeout: float = DEFAULT_TIMEOUT
) -> AsyncIterator[Snapshot]:
    """Revert the VM to snapshot ``name`` when the block ends, however it ends.

    The snapshot is taken on entry if it does not exist yet (with :func:`golden`: an internal
    checkpoint where the disks allow it). The revert on exit also runs on an error and on
    cancellation: shielded, bounded by ``timeout``. If the block failed and the revert fails
    too, the block's exception propagates with a note about the revert.
    """
    try:
        snapshot = vm.info(name)
    except SnapshotNotFoundError:
        snapshot = await golden(vm, name, timeout=timeout)
    try:
        yield snapshot
    except BaseException as exc:
        try:
            await shielded(reset(vm, name, timeout=timeout))
        except Exception as revert_exc:
            exc.add_note(f"qemusnap: reverting to {name!r} failed too: {revert_exc}")
        raise
    await shielded(reset(vm, name, timeout=timeout))
