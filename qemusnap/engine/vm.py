"""The :class:`VM` facade: the handle callers hold.

It opens a VM (:meth:`VM.attach`, :meth:`VM.launch`, :meth:`VM.cold`), answers the tree
queries, and hands each operation to the room that owns it, with the VM's
:class:`~qemusnap.engine.context.Context`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

from .. import agent as agent_mod
from ..aio import deadline
from ..discover import Difference
from ..errors import ImageInUseError, OperationError, QemuSnapError, UnsupportedError
from ..machine import Machine, MachineConfig, RecordedLaunch
from ..memory import MemoryFiles, Progress
from ..models import Chain, CheckResult, Disk, Snapshot, VMState
from ..monitor import Monitor, QMPClient
from ..qemu_img import QemuImg
from ..store import Store, VMRecord
from ..tree import SnapshotTree
from . import clone, create, delete, journal, resets, revert, save_restore, shared
from . import rebuild as rebuild_room
from .context import DEFAULT_TIMEOUT, LOCK_TIMEOUT, Context, RelaunchHook, log
from .opening import (
    cold_record,
    find_or_add_vm,
    forget_if_unused,
    refuse_throwaway_overlays,
    wait_until_free,
)


class VM:
    """One VM under qemusnap's care.  An async context manager; every coroutine has a timeout."""

    def __init__(
        self,
        store: Store,
        record: VMRecord,
        *,
        monitor: Monitor | None = None,
        machine: Machine | None = None,
        qmp_socket: str | None = None,
        qga_socket: str | None = None,
        relaunch_hook: RelaunchHook | None = None,
        lock_timeout: float = LOCK_TIMEOUT,
        qemu_img: QemuImg | None = None,
    ) -> None:
        self.ctx = Context(
            store,
            record,
            monitor=monitor,
            machine=machine,
            qmp_socket=qmp_socket,
            qga_socket=qga_socket,
            relaunch_hook=relaunch_hook,
            lock_timeout=lock_timeout,
            # The store keeps what qemu-img said about each image until the image changes
            # (qemu_img.ImageCache): with 1,000 snapshots one ``qemu-img info`` costs 0.2 s.
            qemu_img=qemu_img or QemuImg(cache=store),
        )
        #: Whether opening this VM recorded it in the state directory for the first time.
        self.new_record = False

    # The context's parts, as attributes of the VM (a restart replaces monitor and machine).

    @property
    def store(self) -> Store:
        return self.ctx.store

    @property
    def record(self) -> VMRecord:
        return self.ctx.record

    @property
    def monitor(self) -> Monitor | None:
        return self.ctx.monitor

    @monitor.setter
    def monitor(self, monitor: Monitor | None) -> None:
        self.ctx.monitor = monitor

    @property
    def machine(self) -> Machine | None:
        return self.ctx.machine

    @machine.setter
    def machine(self, machine: Machine | None) -> None:
        self.ctx.machine = machine

    @property
    def qmp_socket(self) -> str | None:
        return self.ctx.qmp_socket

    @property
    def qga_socket(self) -> str | None:
        return self.ctx.qga_socket

    @property
    def relaunch_hook(self) -> RelaunchHook | None:
        return self.ctx.relaunch_hook

    @relaunch_hook.setter
    def relaunch_hook(self, hook: RelaunchHook | None) -> None:
        self.ctx.relaunch_hook = hook

    @property
    def lock_timeout(self) -> float:
        return self.ctx.lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float) -> None:
        self.ctx.lock_timeout = seconds

    @property
    def qemu_img(self) -> QemuImg:
        return self.ctx.qemu_img

    @property
    def memory(self) -> MemoryFiles:
        return self.ctx.memory

    @property
    def agent(self) -> agent_mod.GuestAgent | None:
        """The guest-agent connection while the guest is quiesced (None otherwise)."""
        return self.ctx.agent

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    async def attach(
        cls,
        qmp: str | Monitor | QMPClient,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        qga_socket: str | None = None,
        relaunch_hook: RelaunchHook | None = None,
        allow_other_user: bool = False,
        timeout: float = 30.0,
        discover: bool = True,
    ) -> VM:
        """Open a running QEMU by its QMP socket path, a connected :class:`Monitor`, or a
        connected ``qemu.qmp.QMPClient`` the caller keeps using.

        QEMU serves one QMP client at a time: while another qemusnap operation holds this VM,
        connecting would just hang, so its lock is awaited first (``BusyError`` after
        ``$QEMUSNAP_LOCK_TIMEOUT``).  The command line of the process behind a socket path is
        recorded (SO_PEERCRED, then ``/proc/PID/cmdline``) so a revert that must restart QEMU
        can do so.  A QEMU owned by
        another user is refused unless ``allow_other_user``: qemusnap would create files and
        restart processes on that user's behalf.

        On first contact (the store has no snapshot of this VM), the snapshots its images
        already hold are adopted (:meth:`adopt`), unless ``discover`` is false.
        """
        if isinstance(qmp, str):
            qmp = os.path.abspath(qmp)
            await wait_until_free(state_dir, qmp)
            monitor = await Monitor.connect(qmp, timeout=timeout)
        elif isinstance(qmp, Monitor):
            monitor = qmp
        else:
            monitor = Monitor.from_client(qmp)
        owner = monitor.peer_uid()
        if owner is not None and owner != os.getuid() and not allow_other_user:
            await monitor.close()
            raise UnsupportedError(
                f"the QEMU behind {qmp} belongs to uid {owner}, not to you (uid {os.getuid()}):"
                " refusing to drive it (--allow-other-user overrides)"
            )
        try:
            disks = await asyncio.wait_for(monitor.disks(), timeout)
            launch: dict[str, Any] | None = None
            if isinstance(qmp, str):
                pid = monitor.peer_pid()
                if pid is not None:
                    launch = RecordedLaunch.of_pid(pid, os.path.abspath(qmp)).to_json()
            refuse_throwaway_overlays(disks, launch)
        except BaseException:
            if monitor is not qmp:
                await monitor.close()
            raise
        store = Store(state_dir)
        try:
            known = {v.id for v in store.vms()}
            record = await find_or_add_vm(store, disks)
            store.set_vm_info(
                record.id, qmp_socket=qmp if isinstance(qmp, str) else None, launch=launch
            )
            vm = cls(
                store,
                store.vm(record.id),
                monitor=monitor,
                qmp_socket=qmp if isinstance(qmp, str) else None,
                qga_socket=qga_socket,
                relaunch_hook=relaunch_hook,
            )
            vm.new_record = record.id not in known
        except BaseException:
            store.close()
            if monitor is not qmp:
                await monitor.close()
            raise
        if discover:
            await vm._first_contact()
        return vm

    @classmethod
    async def launch(
        cls,
        config: MachineConfig,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        paused: bool = False,
        timeout: float = 60.0,
    ) -> VM:
        """Start a QEMU from ``config`` and open it; closing the VM shuts that QEMU down."""
        machine = Machine(config, paused=paused, launch_timeout=timeout)
        await machine.launch()
        try:
            vm = await cls.attach(
                machine.monitor, state_dir=state_dir, qga_socket=config.qga_socket, timeout=timeout
            )
        except BaseException:
            await machine.shutdown()
            raise
        vm.machine = machine
        # The command line a clone of this VM starts from, also in another process (pytest
        # workers): not under "argv", which would make qemusnap restart it as a foreign QEMU.
        vm.store.set_vm_info(
            vm.record.id, launch={"machine_argv": config.argv(), "cwd": os.getcwd()}
        )
        return vm

    @classmethod
    async def cold(
        cls,
        disks: Sequence[str] = (),
        *,
        state_dir: str | os.PathLike[str] | None = None,
        relaunch_hook: RelaunchHook | None = None,
        timeout: float = 60.0,
        discover: bool = True,
    ) -> VM:
        """Open the disk images of a VM that is not running.

        A disk the state directory knows (any image of its chain, the original base included)
        names its VM, whose disks then come from the store; with no disks, the state directory
        must know exactly one VM.  First contact adopts as :meth:`attach` does.
        """
        store = Store(state_dir)
        try:
            known = {v.id for v in store.vms()}
            record = await asyncio.wait_for(cold_record(store, disks), timeout)
        except BaseException:
            store.close()
            raise
        vm = cls(store, record, relaunch_hook=relaunch_hook)
        vm.new_record = record.id not in known
        if discover:
            await vm._first_contact()
        return vm

    async def _first_contact(self) -> None:
        """A VM with no snapshot in the store: adopt what its images already hold (tags made by
        ``qemu-img snapshot -c``, ``savevm``, libvirt; snapshots whose sidecars survived a lost
        state directory).  Best effort: a disk that cannot be read does not stop the command."""
        if self.store.snapshots(self.record.id) or self.store.journal(self.record.id):
            return
        try:
            await self.adopt(timeout=60.0)
        except (OperationError, TimeoutError) as exc:
            log.warning("could not look for snapshots already in the images: %s", exc)

    async def close(self) -> None:
        try:
            if self.machine is not None:
                await self.machine.shutdown()
            elif self.monitor is not None:
                await self.monitor.close()
        finally:
            self.store.close()

    async def __aenter__(self) -> VM:
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        if isinstance(exc, QemuSnapError) and self.new_record:
            # A refused (or failed and rolled back) first command leaves the state
            # directory as it was.
            self.new_record = not forget_if_unused(self.store, self.record.id)
        await asyncio.shield(self.close())

    @property
    def live(self) -> bool:
        return self.monitor is not None

    # --- inspection ---------------------------------------------------------------------------

    async def disks(self, *, timeout: float = 30.0) -> list[Disk]:
        """The VM's writable disks now (live: from QEMU; cold: from the store)."""
        return await shared.disks(self.ctx, timeout=timeout)

    async def chains(self, disk: str | None = None, *, timeout: float = 60.0) -> list[Chain]:
        """The backing chain of each disk (``-U`` when QEMU has it open), active first."""
        disks = await self.disks(timeout=timeout)
        if disk is not None:
            disks = [shared.find_disk(disks, disk)]
        return [
            await self.qemu_img.chain(d.name, d.file, force_share=self.live, timeout=timeout)
            for d in disks
        ]

    async def check(
        self, repair: Literal["leaks", "all"] | None = None, *, timeout: float = 600.0
    ) -> list[CheckResult]:
        """``qemu-img check`` of every image of every chain.  Repair writes, so it is refused on
        images a running QEMU holds (SPEC safety rule 2)."""
        if repair is not None and self.live:
            raise ImageInUseError(
                "cannot repair images a running QEMU holds: stop the VM, then run check"
                " --repair with --disk"
            )
        if self.monitor is not None:
            # QEMU caches qcow2 metadata (refcounts, L2 tables): without a flush, a check -U of
            # a busy image reports clusters as leaked that QEMU simply has not written back yet.
            for disk in await self.monitor.disks():
                if disk.device and not disk.read_only:
                    await self.monitor.qemu_io(disk.device, "flush")
        results: list[CheckResult] = []
        seen: set[str] = set()
        for chain in await self.chains(timeout=timeout):
            for image in chain.images:
                if image.filename in seen:
                    continue
                seen.add(image.filename)
                if repair is not None and await self.qemu_img.image_in_use(
                    image.filename, for_write=True
                ):
                    raise ImageInUseError(
                        f"cannot repair {image.filename}: a running QEMU has it open"
                    )
                # Each image alone (qemu_img.QemuImg.check, without_backing): the chain was
                # opened once above, so an n-deep chain costs n opens, not n²/2.
                results.append(
                    await self.qemu_img.check(
                        image.filename,
                        repair=repair,
                        force_share=self.live,
                        fmt=image.format,
                        without_backing=image.backing_filename is not None
                        and image.filename.startswith("/"),
                        timeout=timeout,
                    )
                )
        return results

    def tree(self) -> SnapshotTree:
        return SnapshotTree.of(self.store.snapshots(self.record.id))

    def snapshots(self) -> list[Snapshot]:
        return list(self.tree())

    def info(self, name: str) -> Snapshot:
        return self.store.snapshot(self.record.id, name)

    def current(self) -> Snapshot | None:
        return self.tree().current

    def parent(self, name: str) -> Snapshot | None:
        snap = self.store.snapshot(self.record.id, name)
        return self.store.snapshot(self.record.id, snap.parent) if snap.parent else None

    async def run_state(self, *, timeout: float = 10.0) -> VMState:
        return await shared.run_state(self.ctx, timeout=timeout)

    # --- operations: each handed to its room --------------------------------------------------

    async def recover(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Finish or roll back whatever an interrupted qemusnap left (also done by every
        operation before it starts)."""
        await journal.recover(self.ctx, timeout=timeout)

    async def create(
        self,
        name: str,
        *,
        description: str = "",
        disk_only: bool = False,
        internal: bool | None = None,
        memory_file: str | None = None,
        live: bool = False,
        quiesce: bool = False,
        halt: bool = False,
        exclude: Iterable[str] = (),
        overlays: dict[str, str] | None = None,
        reuse_external: bool = False,
        progress: Progress | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Snapshot:
        """Take snapshot ``name`` (SPEC "Create" tells what each combination means).

        As with virsh: no flags on a running VM is an internal checkpoint, on a stopped VM
        internal disk snapshots; ``disk_only`` alone is an external disk-only snapshot;
        ``memory_file`` (or ``internal=False`` on a running VM) an external checkpoint.
        """
        return await create.create(
            self.ctx, name, description=description, disk_only=disk_only, internal=internal,
            memory_file=memory_file, live=live, quiesce=quiesce, halt=halt, exclude=exclude,
            overlays=overlays, reuse_external=reuse_external, progress=progress,
            timeout=timeout,
        )  # fmt: skip

    async def revert(
        self,
        name: str,
        *,
        running: bool = False,
        paused: bool = False,
        force: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Snapshot:
        """Bring the VM back to snapshot ``name`` (SPEC "Revert").

        A checkpoint comes back in the run state it was taken in unless ``running``/``paused``
        say otherwise.  Reverting a running VM to a disk-only snapshot restarts QEMU on the
        reverted disks (its running state is lost): that needs ``force``.
        """
        return await revert.revert(
            self.ctx, name, running=running, paused=paused, force=force, timeout=timeout
        )

    async def delete(
        self,
        name: str,
        *,
        children: bool = False,
        children_only: bool = False,
        metadata_only: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[str]:
        """Delete snapshot ``name`` (and/or its descendants); returns the names removed.

        Without ``children`` the deleted snapshot's children move to its parent.  External
        snapshots are merged away so that no other snapshot and no running disk loses data;
        ``metadata_only`` forgets them and touches no file.
        """
        return await delete.delete(
            self.ctx, name, children=children, children_only=children_only,
            metadata_only=metadata_only, timeout=timeout,
        )  # fmt: skip

    async def clone(
        self,
        snapshot: str,
        directory: str,
        *,
        name: str | None = None,
        net: dict[str, str] | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> VM:
        """Start a new, independent VM from external checkpoint ``snapshot``, in ``directory``
        (absent or empty): new overlays over the checkpoint's frozen images, its memory file
        read-only, its own QMP socket ``directory/qmp.sock`` and state directory
        ``directory/state``.  This VM is not touched.  ``net`` maps network backends that
        cannot be shared to replacements (see :func:`qemusnap.clone_argv.clone_argv`).

        The clone is returned open; closing it leaves its QEMU running.
        """
        async with deadline(timeout, f"clone {snapshot}"):
            made = await clone.clone(
                self.ctx, snapshot, directory, name=name, net=net, timeout=timeout
            )
        return VM(made.store, made.record, monitor=made.monitor, qmp_socket=made.qmp_socket)

    async def adopt(self, *, timeout: float = DEFAULT_TIMEOUT) -> list[Snapshot]:
        """Add the snapshots the images hold that the store does not know (``adopted`` for
        tags another tool made; see docs/adopt.md).  Returns those added."""
        return await rebuild_room.adopt(self.ctx, timeout=timeout)

    async def rebuild(
        self, search: Sequence[str] = (), *, apply: bool = False, timeout: float = DEFAULT_TIMEOUT
    ) -> rebuild_room.RebuildReport:
        """Rebuild the store's tree from the images and the sidecars beside them (and in
        ``search``): done when the store has no snapshot of this VM or ``apply``; otherwise
        the differences are only reported.  Never writes the images."""
        return await rebuild_room.rebuild(self.ctx, search, apply=apply, timeout=timeout)

    async def differences(self, *, timeout: float = DEFAULT_TIMEOUT) -> list[Difference]:
        """How the store disagrees with the images and sidecars (``check`` reports them)."""
        return await rebuild_room.differences(self.ctx, timeout=timeout)

    async def save(
        self, file: str, *, progress: Progress | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """Save the VM's memory state into ``file`` and stop QEMU (``virsh save``)."""
        await save_restore.save(self.ctx, file, progress=progress, timeout=timeout)

    async def restore(
        self,
        file: str,
        *,
        running: bool = False,
        paused: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Start QEMU again from a memory-only save (``virsh restore``)."""
        await save_restore.restore(self.ctx, file, running=running, paused=paused, timeout=timeout)

    def restore_point(
        self, name: str, *, timeout: float = DEFAULT_TIMEOUT
    ) -> contextlib.AbstractAsyncContextManager[Snapshot]:
        """``async with vm.restore_point("golden"):`` — the VM goes back to snapshot ``name``
        when the block ends, however it ends (taken on entry if it does not exist yet).  See
        :func:`qemusnap.harness.restore_point`."""
        return resets.restore_point(self, name, timeout=timeout)
