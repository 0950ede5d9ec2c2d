"""Restarting QEMU: how this VM's QEMU is started again on moved disks (a relaunch hook, the
:class:`~qemusnap.machine.Machine` qemusnap owns, or the recorded command line with its image
paths rewritten), and how it is stopped.  Nothing here journals: revert, restore, save and
``create --halt`` journal around these steps (finishing a half-done restart is
:func:`qemusnap.engine.revert.recover_restart`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import attrs

from ..errors import OperationTimeout, UnsupportedError
from ..machine import Machine, RecordedLaunch, image_paths_in_argv, relaunch, wait_pid_exit
from .context import Context, Starter
from .shared import (
    disks,
)


def knows_launch(ctx: Context) -> bool:
    """Whether qemusnap can start this VM's QEMU (see :func:`prepare_restart`)."""
    launch = ctx.store.vm(ctx.record.id).launch
    return bool(
        ctx.relaunch_hook is not None or ctx.machine is not None or (launch and "argv" in launch)
    )


async def prepare_restart(
    ctx: Context, new_files: dict[str, str], *, machine_type: str | None = None
) -> Starter:
    """How to start this VM again with disks moved to ``new_files`` (disk name -> image).

    ``machine_type``: the machine type a memory state to load was taken on; a machine type
    alias (``q35``, ``pc``, none) of the command line or config is pinned to it, so the state
    loads after a QEMU upgrade (a caller's relaunch hook chooses for itself).

    Everything that can be refused is refused here, *before* anything is stopped.

    A disk not in ``new_files`` restarts on the image it runs on now: the recorded command
    line (or the machine's config) names the image QEMU was started with, which a later
    external snapshot may have frozen under an overlay; starting on it would lose the
    overlay's data and write into a snapshot's image.
    """
    moved = dict(new_files)
    new_files = {d.name: d.file for d in await disks(ctx)} | moved
    if ctx.relaunch_hook is not None:
        hook = ctx.relaunch_hook

        async def by_hook(incoming: bool, journal: Any) -> None:
            ctx.monitor = await hook(dict(new_files), incoming)

        return by_hook
    if ctx.machine is not None:
        machine = ctx.machine
        config = attrs.evolve(
            machine.config,
            drives=tuple(
                attrs.evolve(d, file=new_files.get(d.id, d.file)) for d in machine.config.drives
            ),
        )
        if machine_type is not None:
            config = config.with_machine(machine_type)

        async def by_machine(incoming: bool, journal: Any) -> None:
            # The old Machine stays ctx.machine until the new one runs: a restart that fails
            # falls back to its config.
            started = Machine(config, paused=True, incoming=incoming)
            await started.launch()
            ctx.machine, ctx.monitor = started, started.monitor

        return by_machine
    recorded = ctx.store.vm(ctx.record.id).launch
    if not recorded or "argv" not in recorded:
        raise UnsupportedError(
            "cannot start this VM's QEMU: its command line is unknown (attach once with"
            " --qmp SOCKET while it runs, or pass a relaunch hook)"
        )
    launch = RecordedLaunch.from_json(recorded)
    launch = launch.with_disks(await argv_replacements(ctx, launch, new_files, moved))
    if machine_type is not None:
        launch = launch.with_machine(machine_type)
    log_file = ctx.store.memory_dir(ctx.record.id).parent / "qemu.log"

    async def by_command_line(incoming: bool, journal: Any) -> None:
        def spawned(pid: int) -> None:
            # Recovery must find this QEMU even before it listens on its QMP socket, or it
            # would start a second one on the same images and socket path.
            if journal is not None:
                journal.update(spawned=pid)
                journal.passed("spawned")

        _, ctx.monitor = await relaunch(
            launch, incoming=incoming, log_file=log_file, spawned=spawned
        )
        ctx.store.set_vm_info(ctx.record.id, launch=launch.to_json())

    return by_command_line


async def argv_replacements(
    ctx: Context, launch: RecordedLaunch, new_files: dict[str, str], moved: Iterable[str] = ()
) -> dict[str, str]:
    """Which path of the recorded command line each disk's new image replaces.

    The command line names an image of each disk's backing chain (the original base, if
    external snapshots came later): exactly one, or qemusnap cannot tell what to replace
    (an error for the disks in ``moved``; the others then keep their argument as is).
    """
    named = [p for p in image_paths_in_argv(launch.argv, launch.cwd) if os.path.exists(p)]
    replace: dict[str, str] = {}
    for disk in await disks(ctx):
        if disk.name not in new_files:
            continue
        chain = await ctx.qemu_img.chain(disk.name, disk.file, force_share=True)
        files = {image.filename for image in chain.images}
        hits = [p for p in named if p in files]
        if len(hits) != 1 and disk.name not in moved:
            continue
        if len(hits) != 1:
            raise UnsupportedError(
                f"cannot restart QEMU with disk {disk.name} moved: its command line names"
                f" {len(hits)} images of that disk's chain (use a relaunch hook)"
            )
        replace[hits[0]] = new_files[disk.name]
    return replace


async def stop_qemu(ctx: Context) -> None:
    """``quit`` QEMU and wait until its process is gone (its images unlocked)."""
    assert ctx.monitor is not None
    if ctx.machine is not None:
        await ctx.machine.shutdown()
    else:
        pid = ctx.monitor.peer_pid()
        await ctx.monitor.quit()
        await ctx.monitor.close()
        if pid is not None and not await wait_pid_exit(pid, 30.0):
            raise OperationTimeout(f"QEMU (pid {pid}) did not exit after quit")
    ctx.monitor = None
