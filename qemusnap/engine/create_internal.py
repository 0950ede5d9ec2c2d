"""Create an internal snapshot (tags inside the qcow2 images), and its recovery.

Steps (journal ``create-internal``: ``name``, ``files``, ``paused_by_us``):

1. journaled;
2. the snapshot is taken: cold, ``qemu-img snapshot -c`` per image; live with memory, one
   ``snapshot-save`` job (RAM into the first image); live disk-only, one ``transaction`` of
   ``blockdev-snapshot-internal-sync`` (every disk at one instant, guest frozen if asked);
3. ``taken``; the snapshot is recorded in the store; the entry ends.

Killed before the store lists it, the tags some images may hold are deleted again (a
``snapshot-save`` QEMU goes on with is waited for first, so no tag appears after the repair),
and a VM the save paused is resumed.  Once listed, there is nothing to do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import SnapshotExistsError, UnsupportedError
from ..memory import plain_vmstate
from ..models import Disk, MemoryKind, Snapshot, SnapshotKind, VMState
from .context import DEFAULT_TIMEOUT, Context, job_id
from .journal import Journal, journaled, recovers
from .shared import (
    delete_internal_tags,
    machine_type,
    new_snapshot,
    quiesced,
    run_state,
    tags,
)


async def create_internal(
    ctx: Context,
    name: str,
    chosen: Sequence[Disk],
    disks: Sequence[Disk],
    description: str,
    with_memory: bool,
    quiesce: bool,
) -> Snapshot:
    for disk in sorted(chosen, key=lambda d: not is_firmware_flash(d)):
        if disk.format != "qcow2" and is_firmware_flash(disk):
            # snapshot-save needs every device it saves to hold internal snapshots (qcow2);
            # leaving the NVRAM out would bring the guest back with the wrong UEFI state.
            raise UnsupportedError(
                f"disk {disk.name} ({disk.file}) is the UEFI NVRAM, a {disk.format} image:"
                " an internal checkpoint cannot hold it; keep the NVRAM in qcow2"
                " (-drive if=pflash,format=qcow2,...) or take an external checkpoint"
                " (--memory-file FILE)"
            )
        if disk.format != "qcow2":
            raise UnsupportedError(
                f"disk {disk.name} ({disk.file}) is {disk.format}: only qcow2 images can"
                " hold internal snapshots (use --disk-only for an external snapshot)"
            )
        if any(s.name == name for s in await tags(ctx, disk.file)):
            raise SnapshotExistsError(
                f"image {disk.file} (disk {disk.name}) already holds an internal"
                f" snapshot named {name!r}"
            )
    vm_state = await run_state(ctx)
    snap = new_snapshot(
        ctx,
        name,
        files={d.name: d.file for d in chosen},
        disks=disks,
        kind=SnapshotKind.INTERNAL,
        memory=MemoryKind.INTERNAL if with_memory else MemoryKind.NONE,
        quiesced=quiesce,
        vm_state=vm_state,
        description=description,
        machine_type=await machine_type(ctx) if with_memory and ctx.monitor else None,
    )
    nodes = [d.node_name for d in chosen]
    async with journaled(
        ctx,
        "create-internal",
        name=name,
        files=[d.file for d in chosen],
        paused_by_us=with_memory and vm_state is VMState.RUNNING,
    ) as journal:
        if ctx.monitor is None:
            for disk in chosen:
                await ctx.qemu_img.snapshot_create(disk.file, name)
        elif with_memory:
            # snapshot-save stops the vCPUs for the whole RAM write and restarts them only
            # if they were running: a VM the user had paused stays paused.
            await plain_vmstate(ctx.monitor)
            await ctx.monitor.run_job(
                "snapshot-save",
                {"tag": name, "vmstate": nodes[0], "devices": nodes},
                job_id=job_id("save"),
                timeout=DEFAULT_TIMEOUT,
            )
        else:
            # One transaction: every disk is cut at the same instant.
            actions = [
                {"type": "blockdev-snapshot-internal-sync", "data": {"device": n, "name": name}}
                for n in nodes
            ]
            async with quiesced(ctx, quiesce):
                await ctx.monitor.execute("transaction", {"actions": actions})
        journal.passed("taken")
        ctx.store.add_snapshot(ctx.record.id, snap)
    return snap


@recovers("create-internal")
async def recover_create_internal(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    """Not listed: remove the tag from every image that holds it.  Listed: complete."""
    name = data.get("name", "")
    if not ctx.store.has_snapshot(ctx.record.id, name):
        await delete_internal_tags(ctx, name, data["files"])


def is_firmware_flash(disk: Disk) -> bool:
    """A pflash device (``-drive if=pflash``, ``-machine pflash1=``): its QOM path is
    ``/machine/system.flash0``/``1`` on pc and q35."""
    return (disk.device or "").startswith("/machine/system.flash")
