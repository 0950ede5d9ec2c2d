"""Small steps more than one room takes: the VM's disks and run state, the records of the
images a step made or abandoned, internal snapshot tags, the guest frozen for a cut.

Every function works on a :class:`~qemusnap.engine.context.Context`; none of them journals
(the room that calls it does).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterable, Sequence

from .. import agent as agent_mod
from ..capabilities import machine_option
from ..errors import CommandError, DiskNotFoundError, ImageInUseError
from ..memory import plain_vmstate
from ..models import (
    Consistency,
    Disk,
    DiskSnapshot,
    DiskSnapshotKind,
    MemoryFormat,
    MemoryKind,
    Snapshot,
    SnapshotKind,
    SnapshotTag,
    VMState,
)
from ..store import DiskRecord, utc_now
from .context import DEFAULT_TIMEOUT, QUIESCE_TIMEOUT, Context, job_id, log

# --- the VM now ---------------------------------------------------------------------------------


async def disks(ctx: Context, *, timeout: float = 30.0) -> list[Disk]:
    """The VM's writable disks now (live: from QEMU; cold: from the store)."""
    if ctx.monitor is not None:
        return [d for d in await ctx.monitor.disks(timeout=timeout) if not d.read_only]
    return [Disk(d.name, d.file, d.format) for d in ctx.store.vm(ctx.record.id).disks]


def find_disk(disks: Sequence[Disk], name: str) -> Disk:
    for disk in disks:
        if disk.name == name:
            return disk
    known = ", ".join(d.name for d in disks) or "none"
    raise DiskNotFoundError(f"no disk named {name!r} (disks: {known})")


async def run_state(ctx: Context, *, timeout: float = 10.0) -> VMState:
    if ctx.monitor is None:
        return VMState.SHUTOFF
    status = await ctx.monitor.query_status(timeout=timeout)
    return VMState.RUNNING if status.running else VMState.PAUSED


async def settle(ctx: Context, target: VMState) -> None:
    """Leave QEMU in ``target`` run state."""
    assert ctx.monitor is not None
    status = await ctx.monitor.query_status()
    if target is VMState.RUNNING and not status.running:
        await ctx.monitor.cont()
    elif target is VMState.PAUSED and status.running:
        await ctx.monitor.stop()


async def repause_after_save(ctx: Context) -> None:
    """After saving RAM of a VM the user had paused, QEMU 7.2 leaves it in "postmigrate"
    with its images inactivated: no block job and no further migration work until a
    ``cont``.  There is no way back to "paused" without running (blockdev-set-active is
    QEMU 10), so: ``cont`` then ``stop`` at once; the snapshot is not affected, the guest
    runs for a moment and ends paused, as the user left it."""
    assert ctx.monitor is not None
    if (await ctx.monitor.query_status()).status == "postmigrate":
        await ctx.monitor.cont()
        await ctx.monitor.stop()


async def refuse_in_use(ctx: Context, disks: Sequence[Disk], hint: str) -> None:
    # The probe that the write to come would meet: it opens the file layer alone, so it
    # costs a process start whatever the image holds (``qemu-img info`` of the image would
    # read its whole snapshot table), and it also sees a QEMU that only reads it.
    for disk in disks:
        if await ctx.qemu_img.image_in_use(disk.file, for_write=True):
            raise ImageInUseError(
                f"image {disk.file} (disk {disk.name}) is in use by a running QEMU: {hint}"
            )


async def live_nodes(ctx: Context) -> dict[str, str]:
    """Image file -> node name of its format node, for every image QEMU has open."""
    assert ctx.monitor is not None
    nodes: dict[str, str] = {}
    for node in await ctx.monitor.query_named_block_nodes():
        if node.get("drv") not in ("file", "host_device", "host_cdrom") and node.get("file"):
            nodes.setdefault(str(node["file"]), str(node["node-name"]))
    return nodes


async def tags(ctx: Context, file: str) -> list[SnapshotTag]:
    return await ctx.qemu_img.tags(file, force_share=ctx.live)


async def image_format(ctx: Context, file: str) -> str:
    (info,) = await ctx.qemu_img.info(file, backing_chain=False, force_share=True)
    return info.format


# --- the store's records of images ----------------------------------------------------------------


def adopt_disks(
    ctx: Context, disks: Sequence[Disk], new_files: dict[str, str], *, owned: Iterable[str] = ()
) -> None:
    """Record the disks' active images after they moved to ``new_files``."""
    owned = set(owned)
    with ctx.store.atomic():
        ctx.store.set_disks(
            ctx.record.id,
            [
                DiskRecord(d.name, new_files.get(d.name, d.file),
                           "qcow2" if d.name in new_files else d.format)
                for d in disks
            ],
        )  # fmt: skip
        for path in new_files.values():
            if path in owned or ctx.store.is_owned(ctx.record.id, path):
                ctx.store.add_file(ctx.record.id, path, owned=True, role="overlay")
            else:
                ctx.store.add_file(ctx.record.id, path, owned=False, role="overlay")


def referenced_files(ctx: Context) -> set[str]:
    """Every file a snapshot or a disk of this VM relies on, per the store."""
    files = {d.file for d in ctx.store.vm(ctx.record.id).disks}
    return files | ctx.store.snapshot_files(ctx.record.id)


def remove_created(ctx: Context, paths: Iterable[str | None]) -> None:
    """Unlink files this operation created, unless the store now relies on them."""
    needed = referenced_files(ctx)
    for path in paths:
        if path and path not in needed and os.path.lexists(path):
            os.unlink(path)
            ctx.store.forget_file(ctx.record.id, path)


def discard_abandoned(ctx: Context, files: Iterable[str]) -> None:
    """Former active images nothing refers to any more (the state a revert left behind)
    are removed, if qemusnap made them."""
    needed = referenced_files(ctx)
    for path in files:
        if path not in needed and ctx.store.is_owned(ctx.record.id, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            ctx.store.forget_file(ctx.record.id, path)


def new_snapshot(
    ctx: Context,
    name: str,
    *,
    files: dict[str, str],
    disks: Sequence[Disk],
    kind: SnapshotKind,
    memory: MemoryKind,
    quiesced: bool,
    vm_state: VMState,
    description: str,
    memory_file: str | None = None,
    memory_format: MemoryFormat | None = None,
    machine_type: str | None = None,
) -> Snapshot:
    """The record of a new snapshot; ``files``: disk name -> image holding its data."""
    disk_kind = DiskSnapshotKind(str(kind))
    return Snapshot(
        name=name,
        parent=ctx.store.vm(ctx.record.id).current,
        kind=kind,
        memory=memory,
        memory_file=memory_file,
        # A checkpoint is "full"; disks alone are as consistent as the guest made them.
        consistency=(
            Consistency.FULL
            if memory is not MemoryKind.NONE
            else Consistency.QUIESCED
            if quiesced
            else Consistency.CRASH
        ),
        vm_state=vm_state,
        created=utc_now(),
        description=description,
        disks=tuple(
            DiskSnapshot(d.name, disk_kind, files[d.name])
            if d.name in files
            else DiskSnapshot(d.name, DiskSnapshotKind.EXCLUDED, None)
            for d in disks
        ),
        current=True,
        memory_format=memory_format,
        machine_type=machine_type,
    )


async def machine_type(ctx: Context) -> str | None:
    """The ``-machine`` value of the running machine type, resolved (``pc-q35-7.2`` for
    ``q35``): recorded with a checkpoint so a newer QEMU restores it on the same type."""
    assert ctx.monitor is not None
    try:
        return machine_option(str(await ctx.monitor.machine_type()))
    except CommandError as exc:
        log.warning("cannot read the machine type (qom-get /machine type): %s", exc)
        return None


# --- internal snapshots (create, delete, revert and their recoveries) ---------------------------


async def delete_internal_tags(ctx: Context, name: str, files: Sequence[str]) -> None:
    """Remove tag ``name`` from the images that still hold it (idempotent, for recovery).

    Images QEMU writes go through the ``snapshot-delete`` job; the others through
    ``qemu-img snapshot -d``.
    """
    nodes = {d.file: d.node_name for d in await disks(ctx)} if ctx.monitor else {}
    holding = [
        f for f in files if os.path.exists(f) and any(s.name == name for s in await tags(ctx, f))
    ]
    in_qemu = [nodes[f] for f in holding if nodes.get(f)]
    if ctx.monitor is not None and in_qemu:
        await ctx.monitor.run_job(
            "snapshot-delete",
            {"tag": name, "devices": in_qemu},
            job_id=job_id("delete"),
            timeout=DEFAULT_TIMEOUT,
        )
    for file in holding:
        if file not in nodes:
            await ctx.qemu_img.snapshot_delete(file, name)


async def load_internal(ctx: Context, name: str, holders: Sequence[str]) -> None:
    """``snapshot-load`` of internal checkpoint ``name`` from the images ``holders``."""
    assert ctx.monitor is not None
    # snapshot-load pauses the vCPUs while loading and restarts them only if they were
    # running: the caller settles the final run state.
    nodes = {d.file: d.node_name for d in await disks(ctx)}
    await plain_vmstate(ctx.monitor)
    await ctx.monitor.run_job(
        "snapshot-load",
        {"tag": name, "vmstate": nodes[holders[0]], "devices": [nodes[h] for h in holders]},
        job_id=job_id("load"),
        timeout=DEFAULT_TIMEOUT,
    )


@contextlib.asynccontextmanager
async def quiesced(ctx: Context, quiesce: bool) -> AsyncIterator[None]:
    """Guest filesystems frozen (qemu-guest-agent) for the body, thawed on every exit."""
    if not quiesce:
        yield
        return
    assert ctx.qga_socket is not None
    async with (
        agent_mod.GuestAgent(ctx.qga_socket, timeout=QUIESCE_TIMEOUT) as guest,
        agent_mod.frozen(guest, timeout=QUIESCE_TIMEOUT),
    ):
        ctx.agent = guest
        try:
            yield
        finally:
            ctx.agent = None
