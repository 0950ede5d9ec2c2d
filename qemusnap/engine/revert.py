"""Revert: bring the VM back to a snapshot (SPEC "Revert"), and its recovery.

Internal snapshot (journal ``revert``: ``name``, ``overlays`` (disk -> clone), ``old``,
``target``, ``holders``, ``apply``, ``load``, ``machine_type``):

1. journaled; an image a later external snapshot froze is cloned first, and the clone
   reverted (``overlays-made``);
2. if QEMU must restart (a clone, or disks reverted under a running VM): QEMU is quit
   (``stopped``);
3. not in place: ``qemu-img snapshot -a`` on each holder, the tag removed from the clones;
4. QEMU started again, paused (``started``);
5. in place: ``snapshot-load`` (``loading`` before, ``loaded`` after);
6. the run state wanted, the disks' new images recorded, abandoned images removed.

External snapshot (journal ``revert``: ``name``, ``overlays`` (disk -> fresh overlay on the
snapshot's image), ``old``, ``target``, ``memory``, ``machine_type``: the type a memory
state to load needs, pinned on restart): overlays made (``overlays-made``), QEMU
quit (``stopped``) and started on them (``started``, ``-incoming defer`` for a checkpoint),
memory state loaded, run state settled, disks recorded.

Both also journal ``before`` (the run state of a VM that ran) and ``launch`` (the recorded
command line), and, once QEMU is spawned, its pid (``spawned``, a crash point).  A restart
that fails (QEMU exits, or cannot load the state) is journaled (``restart_failed``) and rolled
back by falling back, once, to the previous images and command line (:func:`fall_back`).

Killed halfway, :func:`recover_revert` decides by how far it got (:func:`recover_restart`):
QEMU already stopped, or already running on the new images, the revert is finished (QEMU
started, memory or snapshot-load done, run state, records); QEMU still on the old images (or a
cold revert not yet recorded), the new images are removed and the VM is as before.  A restore
journals the same keys (no overlays) and is recovered by the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from .. import process
from ..aio import deadline
from ..errors import DiskNotFoundError, OperationError, UnsupportedError
from ..machine import RecordedLaunch, pid_alive, wait_pid_exit
from ..models import (
    Disk,
    DiskSnapshotKind,
    MemoryFormat,
    MemoryKind,
    Snapshot,
    SnapshotKind,
    VMState,
)
from ..monitor import Monitor
from ..plan import overlay_path
from .context import DEFAULT_TIMEOUT, Context, log
from .journal import Journal, journaled, operation, recovers
from .restart import knows_launch, prepare_restart, stop_qemu
from .shared import (
    adopt_disks,
    delete_internal_tags,
    discard_abandoned,
    image_format,
    load_internal,
    refuse_in_use,
    remove_created,
    run_state,
    settle,
    tags,
)
from .shared import disks as current_disks


async def revert(
    ctx: Context,
    name: str,
    *,
    running: bool = False,
    paused: bool = False,
    force: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> Snapshot:
    """Bring the VM back to snapshot ``name`` (see :meth:`qemusnap.VM.revert`)."""
    if running and paused:
        raise UnsupportedError("--running and --paused exclude each other")
    requested = VMState.RUNNING if running else VMState.PAUSED if paused else None
    async with deadline(timeout, f"revert {name}"), operation(ctx, f"revert {name}"):
        snap = ctx.store.snapshot(ctx.record.id, name)  # one row, not the whole tree
        if snap.partial:
            raise UnsupportedError(
                f"{name} is a partial snapshot (a tag only some disks hold): reverting to it"
                " would mix disks from different instants; it can only be deleted"
            )
        if ctx.live and not snap.is_checkpoint and not force:
            raise UnsupportedError(
                f"{name} is a disk-only snapshot: reverting a running VM to it restarts"
                " QEMU and loses its current running state; add --force"
            )
        disks = await current_disks(ctx)
        if snap.kind is SnapshotKind.INTERNAL:
            await revert_internal(ctx, snap, disks, requested)
        else:
            await revert_external(ctx, snap, disks, requested)
        ctx.store.set_current(ctx.record.id, name)
    return ctx.store.snapshot(ctx.record.id, name)


def targets(snap: Snapshot, disks: Sequence[Disk]) -> list[tuple[Disk, str]]:
    """(disk now, image holding the snapshot's data) for each disk the snapshot covers."""
    by_name = {d.name: d for d in disks}
    return [
        (by_name[d.name], d.file)
        for d in snap.disks
        if d.snapshot is not DiskSnapshotKind.EXCLUDED and d.file and d.name in by_name
    ]


async def revert_internal(
    ctx: Context, snap: Snapshot, disks: Sequence[Disk], requested: VMState | None
) -> None:
    """In place where the image holding the snapshot is still the disk's active image: a
    checkpoint with ``snapshot-load`` (same QEMU), disks with ``qemu-img snapshot -a``.

    An image a later external snapshot froze must not change (that snapshot reads it), so
    it is cloned first and the clone reverted: a new branch, like any external revert.
    """
    covered = targets(snap, disks)
    clones: dict[str, str] = {}
    for disk, file in covered:
        if file != disk.file:
            base = (await ctx.qemu_img.chain(disk.name, file, force_share=True)).base
            clones[disk.name] = overlay_path(file, base.filename, snap.name)
    live = ctx.monitor is not None
    # Cold, a checkpoint comes back in the run state it was taken in when qemusnap knows
    # how to start the VM: QEMU starts paused (-S) and loads it in place.
    can_start = not live and snap.memory is MemoryKind.INTERNAL and knows_launch(ctx)
    in_place = snap.memory is MemoryKind.INTERNAL and (live or can_start)
    start = None
    if (live and (clones or not in_place)) or can_start:
        start = await prepare_restart(
            ctx, clones, machine_type=snap.machine_type if in_place else None
        )
    if ctx.monitor is None:
        await refuse_in_use(ctx, disks, "use --qmp SOCKET to revert it live")
    old = [d.file for d in disks]
    holders = [clones.get(disk.name, disk.file) for disk, _ in covered]
    target = requested or (snap.vm_state if in_place else VMState.RUNNING)
    before = str(await run_state(ctx)) if live else None
    # Recovery finishes a revert whose QEMU is already gone (stopped) or restarted: it must
    # know what is left to do (``qemu-img snapshot -a`` on the holders, or a snapshot-load
    # in the new QEMU), the run state wanted, and the images the revert abandons; and, if
    # the restart fails, how to start the VM again as it was.
    async with journaled(
        ctx, "revert", name=snap.name, overlays=clones, old=old, target=str(target),
        holders=holders, apply=not in_place, load=in_place, before=before,
        launch=ctx.store.vm(ctx.record.id).launch,
    ) as journal:  # fmt: skip
        for disk, file in covered:
            if disk.name in clones:
                await clone(ctx, file, clones[disk.name], keep_tag=snap.name)
        journal.passed("overlays-made")
        if start is not None and ctx.monitor is not None:
            await stop_qemu(ctx)
            journal.update(stopped=True)
            journal.passed("stopped")
        if not in_place:
            for holder in holders:
                await ctx.qemu_img.snapshot_apply(holder, snap.name)
            await delete_internal_tags(ctx, snap.name, list(clones.values()))
        async with restart_failure(ctx, journal, restarts=start is not None):
            if start is not None:
                await start(False, journal)
                journal.update(started=True)
                journal.passed("started")
            if in_place:
                # QEMU finishes a snapshot-load job even if we die: recovery (which waits
                # for it) must then treat the revert as done, and loads again to be sure.
                journal.update(loading=True)
                await load_internal(ctx, snap.name, holders)
                journal.update(loaded=True)
                journal.passed("loaded")
            await delete_internal_tags(ctx, snap.name, list(clones.values()))
        if ctx.monitor is not None:
            await settle(ctx, target)
        if clones:
            adopt_disks(ctx, disks, clones, owned=clones.values())
    discard_abandoned(ctx, old)


async def clone(ctx: Context, source: str, target: str, *, keep_tag: str) -> None:
    """A private copy of a frozen image (sparse, reflinked where the filesystem can), with
    only the internal snapshot ``keep_tag`` left in it."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    owner = ctx.owner
    if owner is not None:
        os.fchown(fd, *owner)
    os.close(fd)
    ctx.store.add_file(ctx.record.id, target, owned=True, role="overlay")
    await process.run(
        ["cp", "--sparse=always", "--reflink=auto", source, target], timeout=DEFAULT_TIMEOUT
    )
    for tag in await ctx.qemu_img.snapshot_list(target):
        if tag.name != keep_tag:
            await ctx.qemu_img.snapshot_delete(target, tag.name)


async def revert_external(
    ctx: Context, snap: Snapshot, disks: Sequence[Disk], requested: VMState | None
) -> None:
    """Fresh overlays on top of the snapshot's images (a branch: no image another snapshot
    depends on is ever written); QEMU, if it runs or memory is to be loaded, is restarted on
    them (``-incoming defer`` + the memory file for a checkpoint)."""
    covered = targets(snap, disks)
    overlays: dict[str, str] = {}
    for disk, file in covered:
        base = (await ctx.qemu_img.chain(disk.name, file, force_share=True)).base
        overlays[disk.name] = overlay_path(file, base.filename, snap.name)
    with_memory = snap.memory is MemoryKind.FILE
    if with_memory and (snap.memory_file is None or not os.path.exists(snap.memory_file)):
        raise DiskNotFoundError(f"memory file of {snap.name} is missing: {snap.memory_file}")
    if with_memory and ctx.monitor is None and not knows_launch(ctx):
        # Cold, and no way to start this VM: its disks are reverted, its memory stays in
        # the file for a later revert once qemusnap knows the command line.
        log.info("%s: QEMU's command line is unknown: reverting the disks only", snap.name)
        with_memory = False
    start = None
    if ctx.monitor is not None or with_memory:
        start = await prepare_restart(
            ctx, overlays, machine_type=snap.machine_type if with_memory else None
        )
    else:
        await refuse_in_use(ctx, disks, "use --qmp SOCKET to revert it live")
    old = {d.name: d.file for d in disks}
    target = requested or (snap.vm_state if with_memory else VMState.RUNNING)
    before = str(await run_state(ctx)) if ctx.monitor is not None else None
    async with journaled(
        ctx, "revert", name=snap.name, overlays=overlays, old=list(old.values()),
        target=str(target), memory=with_memory,
        machine_type=snap.machine_type if with_memory else None, before=before,
        launch=ctx.store.vm(ctx.record.id).launch,
    ) as journal:  # fmt: skip
        for disk, file in covered:
            await ctx.qemu_img.create(
                overlays[disk.name],
                backing=file,
                backing_fmt=await image_format(ctx, file),
                owner=ctx.owner,
            )
        journal.passed("overlays-made")
        if start is not None:
            if ctx.monitor is not None:
                await stop_qemu(ctx)
            journal.update(stopped=True)
            journal.passed("stopped")
            async with restart_failure(ctx, journal):
                await start(with_memory, journal)
                journal.update(started=True)
                journal.passed("started")
                if with_memory:
                    assert ctx.monitor is not None and snap.memory_file is not None
                    await ctx.memory.load(
                        ctx.monitor,
                        snap.memory_file,
                        timeout=DEFAULT_TIMEOUT,
                        fmt=snap.memory_format or MemoryFormat.STREAM,
                    )
            await settle(ctx, target)
        adopt_disks(ctx, disks, overlays, owned=overlays.values())
    discard_abandoned(ctx, old.values())


# --- recovery ---------------------------------------------------------------------------------


@recovers("revert")
async def recover_revert(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    """Finish a revert that stopped or restarted QEMU, or remove the new images of one that
    had not (see the module docstring); an internal revert whose QEMU was stopped first
    redoes its cold part (:func:`reapply_internal`) before QEMU is started again."""
    await recover_restart(ctx, data, journal, before_start=reapply_internal)


# --- a half-done restart (revert, restore) ----------------------------------------------------

#: A step to redo before QEMU is started again by a recovery (e.g. the cold part of an
#: internal revert); gets the journal data.
BeforeStart = Callable[[Context, dict[str, Any]], Awaitable[None]]


async def recover_restart(
    ctx: Context, data: dict[str, Any], journal: Journal, before_start: BeforeStart | None = None
) -> None:
    """A revert (or restore), which may have restarted QEMU.

    * QEMU runs on the new overlays (restarted, or a revert in place that loaded its
      snapshot): finish it (memory state, snapshot-load, run state), record the disks and
      "current", remove the images the revert abandoned.
    * The operation had stopped QEMU and none runs now: the old running state is lost
      anyway, so the revert is finished: QEMU is started on the new overlays (roll
      forward), then as above.
    * Otherwise (QEMU still runs on the old disks, or a cold revert): the new overlays
      are removed and the old disks kept.
    """
    overlays: dict[str, str] = data.get("overlays", {})
    if data.get("restart_failed"):
        await fall_back(ctx, data, journal)
        return
    try:
        if ctx.monitor is None and data.get("spawned") and not data.get("started"):
            await reconnect_spawned(ctx, int(data["spawned"]))
        if ctx.monitor is None and data.get("stopped"):
            if before_start is not None:
                await before_start(ctx, data)
            # machine_type: journaled when memory state is to be loaded (None otherwise).
            start = await prepare_restart(ctx, overlays, machine_type=data.get("machine_type"))
            await start(bool(data.get("memory")), journal)
            journal.update(started=True)  # a recovery interrupted now finds it started
            data["started"] = True
        # A QEMU that runs now although the operation had stopped (or spawned) one is the
        # restarted QEMU, whether or not the journal got to say "started" (killed between
        # the spawn and that update, it waits paused (-S) or in "inmigrate": finish it).
        restarted = any(data.get(k) for k in ("started", "loading", "stopped", "spawned"))
        if ctx.monitor is not None and restarted:
            now = await ctx.monitor.disks()
            if all(d.file == overlays.get(d.name, d.file) for d in now):
                await finish_start(ctx, data)
                adopt_disks(ctx, now, overlays, owned=overlays.values())
                if data.get("name"):
                    ctx.store.set_current(ctx.record.id, data["name"])
                discard_abandoned(ctx, data.get("old", []))
                return
    except OperationError as exc:
        if not (data.get("stopped") or data.get("started") or data.get("spawned")):
            raise  # QEMU was not restarted: nothing to fall back from
        # One attempt only: a restart that fails now would fail on every later command.
        log.warning("restarting QEMU on the new images failed: %s", exc)
        data["restart_failed"] = str(exc)
        journal.update(restart_failed=str(exc))
        await drop_restarted(ctx)
        await fall_back(ctx, data, journal)
        return
    in_use = {d.file for d in await current_disks(ctx)} if ctx.monitor is not None else set()
    remove_created(ctx, [p for p in overlays.values() if p not in in_use])


async def finish_start(ctx: Context, data: dict[str, Any]) -> None:
    """A restarted QEMU the interrupted operation left waiting: load its memory state
    (``-incoming defer``) or its internal checkpoint (``snapshot-load``, still to do if
    not journaled as done), then settle the run state the operation wanted."""
    assert ctx.monitor is not None
    status = (await ctx.monitor.query_status()).status
    name = data.get("name")
    target = VMState(data["target"]) if data.get("target") else None
    if status == "inmigrate":
        snap = ctx.store.snapshot(ctx.record.id, name) if name else None
        memory = snap.memory_file if snap else data.get("file")
        if memory is None:
            raise OperationError("a restarted QEMU waits for memory state nobody knows")
        fmt = snap.memory_format if snap else data.get("format")
        await ctx.memory.load(
            ctx.monitor, memory, timeout=DEFAULT_TIMEOUT, fmt=MemoryFormat(fmt or "stream")
        )
        target = target or (snap.vm_state if snap else VMState.RUNNING)
    elif data.get("load") and not data.get("loaded"):
        await load_internal(ctx, data["name"], data["holders"])
        await delete_internal_tags(ctx, data["name"], list(data.get("overlays", {}).values()))
    if target is not None or status in ("inmigrate", "prelaunch"):
        await settle(ctx, target or VMState.RUNNING)


async def reapply_internal(ctx: Context, data: dict[str, Any]) -> None:
    """Redo the cold part of an internal revert that restarts QEMU: ``qemu-img snapshot
    -a`` on each holder, then the tag removed from the clones.  A clone without the tag
    was done already (the tag goes only after the apply); applying twice is harmless."""
    if not data.get("apply"):
        return
    name = data["name"]
    for holder in data.get("holders", []):
        if os.path.exists(holder) and any(t.name == name for t in await tags(ctx, holder)):
            await ctx.qemu_img.snapshot_apply(holder, name)
    await delete_internal_tags(ctx, name, list(data.get("overlays", {}).values()))


# --- a restart that fails -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def restart_failure(
    ctx: Context, journal: Journal, *, restarts: bool = True
) -> AsyncIterator[None]:
    """A failed restart (QEMU did not start, or could not load the state) is journaled, and
    the QEMU it left stopped, before the error goes on to the rollback: that then falls back
    to the previous images at once (:func:`fall_back`) instead of trying the failing restart
    again, and finds no QEMU whose leftovers it would have to stop first."""
    try:
        yield
    except OperationError as exc:
        if restarts:
            journal.update(restart_failed=str(exc))
            await drop_restarted(ctx)
        raise


async def fall_back(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    """A revert or restore whose new QEMU did not start (or could not load the state): the VM
    goes back to what it was before, once.  The new QEMU, if it lives, is stopped; the new
    images are removed; the command line recorded before comes back; a VM that ran before is
    started again on its previous images (still what the store records: they change only once
    the restart succeeded), in its previous run state.  Its RAM is lost with the QEMU the
    operation stopped: it boots afresh.

    If even that start fails, the VM is left stopped on its previous images, and the journal
    entry ends anyway: retrying on every later command would fail the same way.  What became
    of the VM is the entry's ``outcome``, for the user."""
    await drop_restarted(ctx)
    if data.get("launch") is not None:
        # A restart records its command line as soon as QEMU runs (so that recovery knows
        # it): the previous one comes back from the journal.
        ctx.store.set_vm_info(ctx.record.id, launch=data["launch"])
    remove_created(ctx, list(data.get("overlays", {}).values()))
    before = data.get("before")
    outcome = "(the VM stays stopped, on its previous images)"
    if before is not None and not data.get("fallback_failed"):
        try:
            start = await prepare_restart(ctx, {})
            await start(False, None)
            await settle(ctx, VMState(before))
            outcome = "(the VM was started again on its previous images and command line)"
        except OperationError as exc:
            await drop_restarted(ctx)
            journal.update(fallback_failed=str(exc))
            log.warning("QEMU did not start on the previous images either: %s", exc)
    if data.get("fallback_failed"):
        outcome = (
            f"(QEMU did not start on the previous images either: {data['fallback_failed']};"
            " the VM is stopped, its disks hold what they held before; start it with its usual"
            " command line)"
        )
    journal.update(outcome=outcome)


async def drop_restarted(ctx: Context) -> None:
    """Stop the QEMU a failed restart left (quit, else SIGKILL), if any."""
    monitor, ctx.monitor = ctx.monitor, None
    if monitor is None:
        return
    if ctx.machine is not None:
        await ctx.machine.shutdown(timeout=5.0)
        return
    pid = monitor.peer_pid()
    with contextlib.suppress(Exception):
        await monitor.quit()
    with contextlib.suppress(Exception):
        await monitor.close()
    if pid is not None and not await wait_pid_exit(pid, 10.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await wait_pid_exit(pid, 10.0)


async def reconnect_spawned(ctx: Context, pid: int) -> None:
    """The QEMU an interrupted restart spawned, if it still lives: wait until it listens on
    its QMP socket and use it.  Starting another instead would race it for the images and the
    socket path (QEMU unlinks and binds the path at start), and leave one of the two waiting,
    paused, behind a socket nobody can reach."""
    recorded = ctx.store.vm(ctx.record.id).launch
    if not recorded or "qmp_socket" not in recorded:
        return
    path = str(recorded["qmp_socket"])
    until = asyncio.get_running_loop().time() + 30.0
    while runs_qemu_on(pid, path):
        try:
            monitor = await Monitor.connect(path, timeout=2.0)
        except Exception:  # not listening yet
            if asyncio.get_running_loop().time() > until:
                break
            await asyncio.sleep(0.05)
            continue
        if monitor.peer_pid() == pid:
            ctx.monitor = monitor
            launch = RecordedLaunch.of_pid(pid, path).to_json()
            ctx.store.set_vm_info(ctx.record.id, launch=launch)
            return
        await monitor.close()  # another process serves the path: not ours to touch
        return
    if runs_qemu_on(pid, path):
        # Spawned by the operation and never answering: it holds the new images.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        await wait_pid_exit(pid, 10.0)


def runs_qemu_on(pid: int, qmp_socket: str) -> bool:
    """Whether process ``pid`` lives and names ``qmp_socket`` on its command line (a pid the
    journal recorded may have been reused since)."""
    if not pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(qmp_socket.encode() in arg for arg in argv)
