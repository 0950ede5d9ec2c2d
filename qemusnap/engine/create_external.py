"""Create an external snapshot (disk-only, or a checkpoint with a memory file), and its
recovery.

Steps (journal ``create-external``: ``name``, ``overlays`` [{disk, path, made}],
``memory_file``, ``snapshot`` (the record to add), ``disks``; later ``memory_made``,
``paused_by_us``, ``memory_written``):

1. journaled; the new overlay files are made (``overlays-made``);
2. live: each overlay is opened (``blockdev-add``, ``nodes-added``); disk-only, one
   ``transaction`` of ``blockdev-snapshot`` cuts every disk at one instant (``cut``); a
   checkpoint: ``stop`` (``paused``), the cut (``cut``), the RAM into the memory file
   (``memory-written``), then the run state the VM had;
3. the snapshot, the disks' new active images and the memory file are recorded; with
   ``halt``, QEMU is quit while still journaled; the entry ends.

Killed before the memory file is written (or for a disk-only snapshot, before the store lists
it): rolled back.  A disk already switched to its overlay is committed back into the image
below (active ``block-commit`` and pivot, or ``qemu-img commit`` when QEMU is gone), so no
guest write is lost; the overlay files and a partial memory file are removed, a VM paused for
the checkpoint is resumed.  Killed after the memory file was written: the snapshot is
complete, so it is finished (recorded) instead of thrown away.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Sequence
from typing import Any

from .. import hostmem
from ..errors import DiskNotFoundError, OperationError, TargetExistsError, UnsupportedError
from ..memory import Progress
from ..models import Disk, MemoryKind, Snapshot, SnapshotKind, VMState
from ..plan import file_part, overlay_path
from .context import DEFAULT_TIMEOUT, Context, job_id
from .journal import Journal, journaled, recovers
from .restart import stop_qemu
from .shared import (
    adopt_disks,
    live_nodes,
    machine_type,
    new_snapshot,
    quiesced,
    remove_created,
    repause_after_save,
    run_state,
    settle,
)
from .shared import (
    disks as current_disks,
)


async def create_external(
    ctx: Context,
    name: str,
    chosen: Sequence[Disk],
    disks: Sequence[Disk],
    description: str,
    with_memory: bool,
    memory_file: str | None,
    live: bool,
    quiesce: bool,
    overlays: dict[str, str],
    reuse: bool,
    halt: bool,
    progress: Progress | None,
) -> Snapshot:
    """Overlays are prepared first; then, live, one ``transaction`` of ``blockdev-snapshot``
    cuts every disk at one instant.  With memory: ``stop``, the transaction, the RAM into
    the memory file (``background-snapshot`` when ``live``), ``cont``."""
    plan = [(disk, await overlay_for(ctx, disk, name, overlays, reuse)) for disk in chosen]
    memory_path = None
    if with_memory:
        memory_path = os.path.abspath(
            memory_file or str(ctx.store.memory_dir(ctx.record.id) / f"{file_part(name, 200)}.mem")
        )
        if os.path.lexists(memory_path):
            raise TargetExistsError(f"{memory_path} exists already (it is never overwritten)")
    vm_state = await run_state(ctx)
    pausing = with_memory and vm_state is VMState.RUNNING
    memory_format = None
    if memory_path is not None and ctx.monitor is not None:
        # Decided (and journaled with the record) before anything is written.
        mechanism = await ctx.memory.save_mechanism(ctx.monitor, live=live and pausing)
        memory_format = mechanism.format
    snap = new_snapshot(
        ctx,
        name,
        files={d.name: d.file for d in chosen},
        disks=disks,
        kind=SnapshotKind.EXTERNAL,
        memory=MemoryKind.FILE if with_memory else MemoryKind.NONE,
        memory_file=memory_path,
        quiesced=quiesce,
        vm_state=vm_state,
        description=description,
        memory_format=memory_format,
        machine_type=await machine_type(ctx) if memory_path is not None and ctx.monitor else None,
    )
    made = [path for disk, path in plan if not (reuse and disk.name in overlays)]
    # The snapshot's record and the disks go into the journal: once the memory file is
    # written the snapshot is complete, and recovery records it instead of undoing it.
    async with journaled(
        ctx,
        "create-external",
        name=name,
        overlays=[{"disk": d.name, "path": p, "made": p in made} for d, p in plan],
        memory_file=memory_path,
        snapshot=snap.to_json(),
        disks=[d.to_json() for d in disks],
    ) as journal:
        for disk, path in plan:
            if path in made:
                await ctx.qemu_img.create(
                    path, backing=disk.file, backing_fmt=disk.format, owner=ctx.owner
                )
        journal.passed("overlays-made")
        if ctx.monitor is not None:
            async with overlay_nodes(ctx, plan) as nodes:
                journal.passed("nodes-added")
                if memory_path is None:
                    async with quiesced(ctx, quiesce):
                        await cut_to_overlays(ctx, plan, nodes)
                    journal.passed("cut")
                else:
                    journal.update(memory_made=True)
                    await checkpoint(
                        ctx, plan, nodes, memory_path, pausing=pausing,
                        live=live and pausing, progress=progress, journal=journal,
                    )  # fmt: skip
            if pausing and not halt:
                await settle(ctx, VMState.RUNNING)
            elif memory_path is not None and not halt:
                await repause_after_save(ctx)
        with ctx.store.atomic():
            ctx.store.add_snapshot(ctx.record.id, snap)
            adopt_disks(ctx, disks, {d.name: p for d, p in plan}, owned=made)
            if memory_path is not None:
                ctx.store.add_file(ctx.record.id, memory_path, owned=True, role="memory")
        if halt and ctx.monitor is not None:
            # Still journaled: killed before QEMU is gone, recovery resumes the VM that
            # was paused for the checkpoint (the snapshot is complete and stays).
            await stop_qemu(ctx)
    return snap


async def overlay_for(
    ctx: Context, disk: Disk, name: str, overlays: dict[str, str], reuse: bool
) -> str:
    """The overlay of ``disk``: chosen (``--overlay``), reused, or the default beside it."""
    if disk.name not in overlays:
        base = (await ctx.qemu_img.chain(disk.name, disk.file, force_share=True)).base
        return overlay_path(disk.file, base.filename, name)
    path = os.path.abspath(overlays[disk.name])
    if not reuse:
        if os.path.lexists(path):
            raise TargetExistsError(
                f"{path} exists already (it is never overwritten; --reuse-external uses it)"
            )
        return path
    if not os.path.exists(path):
        raise DiskNotFoundError(f"--reuse-external: {path} does not exist")
    (info,) = await ctx.qemu_img.info(path, backing_chain=False, force_share=True)
    if info.format != "qcow2" or info.backing_filename != disk.file:
        raise UnsupportedError(
            f"--reuse-external: {path} must be a qcow2 image whose backing file is"
            f" {disk.file} (it is {info.format}, backed by {info.backing_filename})"
        )
    return path


@contextlib.asynccontextmanager
async def overlay_nodes(ctx: Context, plan: Sequence[tuple[Disk, str]]) -> AsyncIterator[list[str]]:
    """``blockdev-add`` each overlay (before any pause: opening files takes time); on
    failure, the nodes not yet installed are deleted again."""
    monitor = ctx.monitor
    assert monitor is not None
    added: list[str] = []
    try:
        for _, path in plan:
            node = f"qs-{secrets.token_hex(6)}"
            # blockdev-snapshot wants an overlay without a backing ("backing": null): it
            # installs the current node under it.  QEMU never touches an existing file
            # here (unlike blockdev-snapshot-sync, which would overwrite one).
            await monitor.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": node,
                    "file": {"driver": "file", "filename": path},
                    "backing": None,
                },
            )
            added.append(node)
        yield added
    except BaseException:
        # Best effort (a dead QEMU must not mask the error that brought us here); what is
        # left is the journal's to undo.
        with contextlib.suppress(OperationError):
            installed = {d.node_name for d in await current_disks(ctx)}
            for node in added:
                if node not in installed:
                    with contextlib.suppress(OperationError):
                        await asyncio.shield(monitor.execute("blockdev-del", {"node-name": node}))
        raise


async def cut_to_overlays(
    ctx: Context, plan: Sequence[tuple[Disk, str]], nodes: Sequence[str]
) -> None:
    """One ``transaction`` of ``blockdev-snapshot``: every disk cut at the same instant."""
    assert ctx.monitor is not None
    actions = [
        {"type": "blockdev-snapshot", "data": {"node": disk.node_name, "overlay": node}}
        for (disk, _), node in zip(plan, nodes, strict=True)
    ]
    await ctx.monitor.execute("transaction", {"actions": actions})


async def checkpoint(
    ctx: Context,
    plan: Sequence[tuple[Disk, str]],
    nodes: Sequence[str],
    memory_path: str,
    *,
    pausing: bool,
    live: bool,
    progress: Progress | None,
    journal: Journal,
) -> None:
    """Disks and RAM at one instant: ``stop``, the disk cut, ``migrate``.

    Everything else (overlay nodes, the memory file and its fd, migration settings) was
    prepared before the pause.  With ``live`` (background-snapshot) QEMU restarts the
    guest by itself right after the migration setup: the pause is short, and does not
    grow with RAM size when guest RAM is on huge pages (:mod:`qemusnap.hostmem`).
    Without it, the guest stays stopped for the whole RAM write.
    """
    monitor = ctx.monitor
    assert monitor is not None
    if live:
        pid = ctx.machine.pid if ctx.machine is not None else monitor.peer_pid()
        if pid is not None:
            await asyncio.to_thread(hostmem.collapse_guest_ram, pid)
    async with ctx.memory.saving(monitor, memory_path, live=live, owner=ctx.owner) as saver:
        if pausing:
            journal.update(paused_by_us=True)  # before the pause: recovery resumes it
            await monitor.stop()
            journal.passed("paused")
        await cut_to_overlays(ctx, plan, nodes)
        journal.passed("cut")
        # live: QEMU 8.0+ leaves the guest paused for the whole RAM write unless we resume
        # it once the write tracking is armed (see Saver.run).
        await saver.run(timeout=DEFAULT_TIMEOUT, progress=progress, resume_when_armed=live)
        journal.update(memory_written=True)
        journal.passed("memory-written")
    # "cont" right after "completed" can fail with "Migration is not finalized yet":
    # wait for the run state to leave finish-migrate.
    await monitor.wait_status_not("finish-migrate", timeout=30.0)


# --- recovery ---------------------------------------------------------------------------------


@recovers("create-external")
async def recover_create_external(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    """Listed: complete.  Memory written: finish it.  Otherwise: roll it back."""
    if ctx.store.has_snapshot(ctx.record.id, data.get("name", "")):
        return
    if data.get("memory_written"):
        await finish_checkpoint(ctx, data)
    else:
        await undo_overlays(ctx, data.get("overlays", []))
        remove_created(ctx, [data.get("memory_file")] if data.get("memory_made") else [])


async def finish_checkpoint(ctx: Context, data: dict[str, Any]) -> None:
    """An external checkpoint whose disks were cut and whose memory file was written (and
    synced): the snapshot is complete, only the run state and the store's records are
    missing.  Finish it: rolling back would throw a complete snapshot away, and would
    have to block-commit the overlays of a QEMU whose images the migration inactivated."""
    # QEMU was made usable again (see journal.stop_leftovers); a VM we paused is resumed at
    # the end of the recovery, one the user had paused stays paused.
    snap = Snapshot.from_json(data["snapshot"])
    disks = [Disk(d["name"], d["file"], d["format"]) for d in data["disks"]]
    overlays = data.get("overlays", [])
    with ctx.store.atomic():
        ctx.store.add_snapshot(ctx.record.id, snap)
        adopt_disks(
            ctx,
            disks,
            {o["disk"]: o["path"] for o in overlays},
            owned=[o["path"] for o in overlays if o.get("made")],
        )
        ctx.store.add_file(ctx.record.id, data["memory_file"], owned=True, role="memory")


async def undo_overlays(ctx: Context, overlays: Sequence[dict[str, Any]]) -> None:
    """Roll back an external create: a disk already switched to its new overlay is committed
    back (active ``block-commit``, pivot), so nothing the guest wrote is lost; then the
    overlay files qemusnap made are removed."""
    if ctx.monitor is not None:
        paths = {o["path"] for o in overlays}
        for disk in await current_disks(ctx):
            if disk.file in paths and disk.node_name:
                nodes = await live_nodes(ctx)
                (info,) = await ctx.qemu_img.info(disk.file, backing_chain=False,
                                                  force_share=True)  # fmt: skip
                base = info.backing_filename
                if base is not None and base in nodes:
                    job = job_id("undo")
                    await ctx.monitor.run_block_job(
                        "block-commit",
                        {"job-id": job, "device": disk.node_name, "base-node": nodes[base]},
                        job_id=job,
                        timeout=DEFAULT_TIMEOUT,
                    )
        for node in await ctx.monitor.query_named_block_nodes():
            if node.get("file") in paths and node.get("drv") == "qcow2":
                with contextlib.suppress(OperationError):
                    await ctx.monitor.execute("blockdev-del", {"node-name": node["node-name"]})
        # Attaching to this QEMU recorded the overlays as the disks' active images (the cut
        # had happened): record the images the disks run on again now, or the overlays
        # would count as needed and stay behind as orphans.
        adopt_disks(ctx, await current_disks(ctx), {})
    else:
        # No QEMU: it may have died after the cut, with guest writes in the overlays that
        # its last users were told were done.  Commit them back (a no-op for an overlay
        # nothing wrote to) rather than lose them with the files.
        for overlay in overlays:
            if overlay.get("made") and os.path.exists(overlay["path"]):
                await ctx.qemu_img.commit(overlay["path"], keep_top=True)
    remove_created(ctx, [o["path"] for o in overlays if o.get("made")])
