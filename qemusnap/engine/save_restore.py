"""Memory-only save and restore (``virsh save`` / ``virsh restore``), and their recovery.

Save (journal ``save``: ``file``, ``saved`` (the record: file, run state, disks),
``paused_by_us``, ``made``; later ``written``): ``stop``, the RAM into the file, ``written``
(the VM no longer counts as paused by us), QEMU quit (``stopped``), the save recorded.
Killed before the state was all written, the partial file is removed and a VM we paused is
resumed; killed after, with QEMU gone, the save is recorded; with QEMU still there, the file
is removed and a VM that ran runs again.

Restore (journal ``restore``: ``file``, ``target``, ``format`` (stream | mapped-ram),
``machine_type``, ``launch``; later ``spawned``, ``started``, and ``restart_failed`` if QEMU
did not start or load: it then stays stopped): QEMU started waiting
for memory (``-incoming defer``, ``started``), the file loaded, the run state settled.  Killed
halfway, a started QEMU is finished (the load done or waited for, run state settled), see
:func:`qemusnap.engine.revert.recover_restart`.
"""

from __future__ import annotations

import os
from typing import Any

from ..aio import deadline
from ..errors import DiskNotFoundError, TargetExistsError, UnsupportedError
from ..memory import Progress
from ..models import MemoryFormat, VMState
from .context import DEFAULT_TIMEOUT, Context, log
from .journal import Journal, journaled, operation, recovers
from .restart import prepare_restart, stop_qemu
from .revert import recover_restart, restart_failure
from .shared import disks as current_disks
from .shared import machine_type, remove_created, run_state, settle


async def save(
    ctx: Context, file: str, *, progress: Progress | None = None, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Save the VM's memory state into ``file`` and stop QEMU (``virsh save``)."""
    if ctx.monitor is None:
        raise UnsupportedError("save needs a running VM (--qmp SOCKET)")
    path = os.path.abspath(file)
    if os.path.lexists(path):
        raise TargetExistsError(f"{path} exists already (it is never overwritten)")
    async with deadline(timeout, f"save {path}"), operation(ctx, f"save {path}"):
        await prepare_restart(ctx, {})  # restore must be possible: refuse now if not
        vm_state = await run_state(ctx)
        disks = await current_disks(ctx)
        mechanism = await ctx.memory.save_mechanism(ctx.monitor, live=False)
        saved = {
            "file": path,
            "vm_state": str(vm_state),
            "disks": {d.name: d.file for d in disks},
            # How to read it back, also after a QEMU upgrade (absent in older records: a
            # stream, machine type unknown).
            "format": str(mechanism.format),
            "machine_type": await machine_type(ctx),
        }
        async with journaled(
            ctx, "save", file=path, saved=saved, paused_by_us=vm_state is VMState.RUNNING,
            made=True,
        ) as journal:  # fmt: skip
            monitor = ctx.monitor
            assert monitor is not None
            if vm_state is VMState.RUNNING:
                await monitor.stop()
            await ctx.memory.save(
                monitor,
                path,
                live=False,
                timeout=DEFAULT_TIMEOUT,
                progress=progress,
                owner=ctx.owner,
            )
            await monitor.wait_status_not("finish-migrate", timeout=30.0)
            journal.update(written=True, paused_by_us=False)
            journal.passed("written")
            await stop_qemu(ctx)
            journal.passed("stopped")
            with ctx.store.atomic():
                ctx.store.set_saved(ctx.record.id, saved)
                ctx.store.add_file(ctx.record.id, path, owned=False, role="save")


async def restore(
    ctx: Context,
    file: str,
    *,
    running: bool = False,
    paused: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Start QEMU again from a memory-only save (``virsh restore``)."""
    if ctx.monitor is not None:
        raise UnsupportedError("restore needs a stopped VM: this one runs")
    path = os.path.abspath(file)
    if not os.path.exists(path):
        raise DiskNotFoundError(f"no such saved state: {file}")
    async with deadline(timeout, f"restore {path}"), operation(ctx, f"restore {path}"):
        saved = ctx.store.vm(ctx.record.id).saved or {}
        if saved.get("file") not in (None, path):
            log.warning("%s is not this VM's last save (%s)", path, saved.get("file"))
        ours = saved.get("file") == path
        fmt = MemoryFormat(saved.get("format", "stream") if ours else "stream")
        machine = saved.get("machine_type") if ours else None
        start = await prepare_restart(ctx, {}, machine_type=machine)
        default = VMState(saved.get("vm_state", "running"))
        target = VMState.RUNNING if running else VMState.PAUSED if paused else default
        async with (
            journaled(
                ctx,
                "restore",
                file=path,
                target=str(target),
                format=str(fmt),
                machine_type=machine,
                launch=ctx.store.vm(ctx.record.id).launch,
            ) as journal,  # fmt: skip
            restart_failure(ctx, journal),
        ):
            await start(True, journal)
            journal.update(started=True)
            journal.passed("started")
            assert ctx.monitor is not None
            await ctx.memory.load(ctx.monitor, path, timeout=DEFAULT_TIMEOUT, fmt=fmt)
            await settle(ctx, target)


# --- recovery ---------------------------------------------------------------------------------


@recovers("save")
async def recover_save(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    if data.get("written") and ctx.monitor is None:
        with ctx.store.atomic():
            ctx.store.set_saved(ctx.record.id, data["saved"])
            ctx.store.add_file(ctx.record.id, data["file"], owned=False, role="save")
    else:
        # QEMU still runs (the save did not finish: roll it back, and resume the
        # VM if it ran; once the state was written the journal no longer counts
        # it as paused by us), or QEMU died before the state was all written (a
        # partial file nobody may restore from).
        remove_created(ctx, [data["file"]] if data.get("made") else [])
        if (
            ctx.monitor is not None
            and data.get("written")
            and data["saved"]["vm_state"] == str(VMState.RUNNING)
        ):
            await settle(ctx, VMState.RUNNING)


@recovers("restore")
async def recover_restore(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    """A restore journals the keys of a restart (no overlays: the disks stay)."""
    await recover_restart(ctx, data, journal)
