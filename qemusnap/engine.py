"""The engine: snapshot operations on one VM, live (QMP) or cold (qemu-img).

A :class:`VM` is the handle callers hold.  It is opened one of three ways:

* :meth:`VM.attach` — a running QEMU, by its QMP socket path (or a connected :class:`Monitor`);
* :meth:`VM.launch` — a QEMU qemusnap starts from a :class:`MachineConfig` (and owns);
* :meth:`VM.cold` — the disk images of a VM that is not running.

Every mutating operation takes the VM's cross-process lock, first repairs what an interrupted
earlier operation left (the journal), and journals itself before its first irreversible step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from . import agent as agent_mod
from .errors import (
    DiskNotFoundError,
    ImageInUseError,
    OperationTimeout,
    SnapshotExistsError,
    UnsupportedError,
    VMNotFoundError,
)
from .machine import Machine, MachineConfig, RecordedLaunch, relaunch, wait_pid_exit
from .models import (
    Chain,
    CheckResult,
    Consistency,
    Disk,
    DiskSnapshot,
    DiskSnapshotKind,
    MemoryKind,
    Snapshot,
    SnapshotKind,
    VMState,
)
from .monitor import Monitor
from .qemu_img import QemuImg
from .store import DiskRecord, Store, VMLock, VMRecord, utc_now
from .tree import SnapshotTree, plan_delete, validate_name

log = logging.getLogger("qemusnap.engine")

#: A caller-supplied way to start the VM again after a revert: gets the active image of each
#: disk (by disk name) and whether memory will be loaded (``-incoming defer`` wanted); returns a
#: connected Monitor of the new, paused QEMU.
RelaunchHook = Callable[[dict[str, str], bool], Awaitable[Monitor]]

DEFAULT_TIMEOUT = 300.0
LOCK_TIMEOUT = 30.0
QUIESCE_TIMEOUT = 10.0


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
        self.store = store
        self.record = record
        self.monitor = monitor
        self.machine = machine
        self.qmp_socket = qmp_socket
        self.qga_socket = qga_socket
        self.relaunch_hook = relaunch_hook
        self.lock_timeout = lock_timeout
        self.qemu_img = qemu_img or QemuImg()
        #: The guest-agent connection while the guest is quiesced (None otherwise).
        self.agent: agent_mod.GuestAgent | None = None

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    async def attach(
        cls,
        qmp: str | Monitor,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        qga_socket: str | None = None,
        relaunch_hook: RelaunchHook | None = None,
        timeout: float = 30.0,
    ) -> VM:
        """Open a running QEMU by its QMP socket path (or a connected Monitor).

        The command line of the process behind a socket path is recorded (SO_PEERCRED, then
        ``/proc/PID/cmdline``) so a revert that must restart QEMU can do so.
        """
        monitor = qmp if isinstance(qmp, Monitor) else await Monitor.connect(qmp, timeout=timeout)
        store = Store(state_dir)
        try:
            disks = await asyncio.wait_for(monitor.disks(), timeout)
            record = await _find_or_add_vm(store, disks, live=True)
            launch: dict[str, Any] | None = None
            if isinstance(qmp, str):
                pid = monitor.peer_pid()
                if pid is not None:
                    launch = RecordedLaunch.of_pid(pid, os.path.abspath(qmp)).to_json()
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
        except BaseException:
            store.close()
            if not isinstance(qmp, Monitor):
                await monitor.close()
            raise
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
        vm.store.set_vm_info(vm.record.id, launch={"config": attrs.asdict(config)})
        return vm

    @classmethod
    async def cold(
        cls,
        disks: Sequence[str] = (),
        *,
        state_dir: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
    ) -> VM:
        """Open the disk images of a VM that is not running.  With no disks, the state
        directory must know exactly one VM."""
        store = Store(state_dir)
        try:
            if disks:
                found = await asyncio.wait_for(_cold_disks(store, disks), timeout)
                record = await _find_or_add_vm(store, found, live=False)
            else:
                known = store.vms()
                if len(known) != 1:
                    raise VMNotFoundError(
                        f"the state directory {store.directory} knows {len(known)} VMs:"
                        " name one with --qmp SOCKET or --disk PATH"
                    )
                record = known[0]
        except BaseException:
            store.close()
            raise
        return cls(store, record)

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

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.shield(self.close())

    @property
    def live(self) -> bool:
        return self.monitor is not None

    # --- inspection ---------------------------------------------------------------------------

    async def disks(self, *, timeout: float = 30.0) -> list[Disk]:
        """The VM's disks now (live: from QEMU; cold: from the store)."""
        if self.monitor is not None:
            return await asyncio.wait_for(self.monitor.disks(), timeout)
        return [Disk(d.name, d.file, d.format) for d in self.record.disks]

    def _disk(self, disks: Sequence[Disk], name: str) -> Disk:
        for disk in disks:
            if disk.name == name:
                return disk
        known = ", ".join(d.name for d in disks) or "none"
        raise DiskNotFoundError(f"no disk named {name!r} (disks: {known})")

    async def chains(self, disk: str | None = None, *, timeout: float = 60.0) -> list[Chain]:
        """The backing chain of each disk (``-U`` when QEMU has it open), active first."""
        disks = await self.disks(timeout=timeout)
        if disk is not None:
            disks = [self._disk(disks, disk)]
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
                if repair is not None and await self.qemu_img.image_in_use(image.filename):
                    raise ImageInUseError(
                        f"cannot repair {image.filename}: a running QEMU has it open"
                    )
                results.append(
                    await self.qemu_img.check(
                        image.filename, repair=repair, force_share=self.live, timeout=timeout
                    )
                )
        return results

    def tree(self) -> SnapshotTree:
        return SnapshotTree.of(self.store.snapshots(self.record.id))

    def snapshots(self) -> list[Snapshot]:
        return list(self.tree())

    def info(self, name: str) -> Snapshot:
        return self.tree().get(name)

    def current(self) -> Snapshot | None:
        return self.tree().current

    def parent(self, name: str) -> Snapshot | None:
        snap = self.tree().get(name)
        return self.tree().get(snap.parent) if snap.parent else None

    async def run_state(self, *, timeout: float = 10.0) -> VMState:
        if self.monitor is None:
            return VMState.SHUTOFF
        status = await self.monitor.query_status(timeout=timeout)
        return VMState.RUNNING if status.running else VMState.PAUSED

    # --- the operation frame ------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _operation(self, what: str) -> AsyncIterator[None]:
        """Hold the VM's lock for one operation (waiting up to ``lock_timeout``)."""
        lock = VMLock(self.store.lock_path(self.record.id), what)
        deadline = asyncio.get_running_loop().time() + self.lock_timeout
        while not lock.try_acquire():
            if asyncio.get_running_loop().time() > deadline:
                raise lock.busy_error()
            await asyncio.sleep(0.1)
        try:
            await self._recover_pending()
            yield
        finally:
            lock.release()
            self.record = self.store.vm(self.record.id)

    async def _recover_pending(self) -> None:
        """Repair what an interrupted operation left behind (see :meth:`recover`)."""
        for entry in self.store.journal(self.record.id):
            log.warning("repairing interrupted %s (%s)", entry.operation, entry.data)
            await self._recover_entry(entry.operation, entry.data)
            self.store.journal_end(entry.id)

    async def recover(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        async with asyncio.timeout(timeout), self._operation("recover"):
            pass

    async def _recover_entry(self, operation: str, data: dict[str, Any]) -> None:
        name = data.get("name")
        if (
            operation == "create-internal"
            and name is not None
            and not self.store.has_snapshot(self.record.id, name)
        ):
            # Roll back: a snapshot that is not in the store never finished.
            await self._delete_internal_tags(name, data["files"])
        if data.get("paused_by_us") and self.monitor is not None:
            status = await self.monitor.query_status()
            if not status.running and status.status == "paused":
                await self.monitor.cont()

    @contextlib.contextmanager
    def _journal(self, operation: str, **data: Any) -> Any:
        entry = self.store.journal_begin(self.record.id, operation, data)
        yield entry
        self.store.journal_end(entry)

    # --- create ---------------------------------------------------------------------------------

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
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Snapshot:
        """Take snapshot ``name`` (see SPEC "Create" for what each combination means).

        Defaults follow virsh: no flags on a running VM is an internal checkpoint; on a stopped
        VM, internal disk snapshots.  ``disk_only`` alone is an external disk-only snapshot.
        """
        validate_name(name)
        exclude = set(exclude)
        external = memory_file is not None or (disk_only and internal is not True)
        if internal is False:
            external = True
        if external or memory_file is not None or overlays or reuse_external or live:
            raise UnsupportedError(
                "external snapshots and memory files are not built yet (internal snapshots are)"
            )
        if quiesce and not self.live:
            raise UnsupportedError("--quiesce needs a running VM (--qmp) and its guest agent")
        if quiesce and not self.qga_socket:
            raise UnsupportedError("--quiesce needs the guest agent socket (--qga SOCKET)")
        async with asyncio.timeout(timeout), self._operation(f"create {name}"):
            if self.store.has_snapshot(self.record.id, name):
                raise SnapshotExistsError(f"a snapshot named {name!r} exists already")
            disks = await self.disks()
            for disk_name in exclude:
                self._disk(disks, disk_name)
            chosen = [d for d in disks if d.name not in exclude and not d.read_only]
            if not chosen:
                raise UnsupportedError("no disk left to snapshot")
            for disk in chosen:
                if disk.format != "qcow2":
                    raise UnsupportedError(
                        f"disk {disk.name} ({disk.file}) is {disk.format}: only qcow2 images can"
                        " hold internal snapshots (use --disk-only for an external snapshot)"
                    )
            await self._refuse_existing_tag(name, chosen)
            if self.monitor is None:
                snap = await self._create_internal_cold(name, chosen, disks, description)
            elif disk_only:
                snap = await self._create_internal_disk_only(
                    name, chosen, disks, description, quiesce
                )
            else:
                if quiesce:
                    raise UnsupportedError(
                        "--quiesce applies to disk-only snapshots (a checkpoint saves memory too)"
                    )
                snap = await self._create_internal_checkpoint(name, chosen, disks, description)
            if halt and self.monitor is not None:
                await self._halt()
        return snap

    async def _refuse_existing_tag(self, name: str, disks: Sequence[Disk]) -> None:
        for disk in disks:
            for info in await self.qemu_img.snapshot_list(disk.file, force_share=self.live):
                if info.name == name:
                    raise SnapshotExistsError(
                        f"image {disk.file} (disk {disk.name}) already holds an internal"
                        f" snapshot named {name!r}"
                    )

    def _new_snapshot(
        self,
        name: str,
        *,
        chosen: Sequence[Disk],
        disks: Sequence[Disk],
        kind: SnapshotKind,
        memory: MemoryKind,
        consistency: Consistency,
        vm_state: VMState,
        description: str,
        memory_file: str | None = None,
    ) -> Snapshot:
        chosen_names = {d.name for d in chosen}
        disk_kind = DiskSnapshotKind(str(kind))
        return Snapshot(
            name=name,
            parent=self.store.vm(self.record.id).current,
            kind=kind,
            memory=memory,
            memory_file=memory_file,
            consistency=consistency,
            vm_state=vm_state,
            created=utc_now(),
            description=description,
            disks=tuple(
                DiskSnapshot(d.name, disk_kind, d.file)
                if d.name in chosen_names
                else DiskSnapshot(d.name, DiskSnapshotKind.EXCLUDED, None)
                for d in disks
            ),
            current=True,
        )

    async def _create_internal_cold(
        self, name: str, chosen: Sequence[Disk], disks: Sequence[Disk], description: str
    ) -> Snapshot:
        for disk in chosen:
            if await self.qemu_img.image_in_use(disk.file):
                raise ImageInUseError(
                    f"image {disk.file} (disk {disk.name}) is in use by a running QEMU:"
                    " use --qmp SOCKET for a live snapshot"
                )
        snap = self._new_snapshot(
            name,
            chosen=chosen,
            disks=disks,
            kind=SnapshotKind.INTERNAL,
            memory=MemoryKind.NONE,
            consistency=Consistency.CRASH,
            vm_state=VMState.SHUTOFF,
            description=description,
        )
        with self._journal("create-internal", name=name, files=[d.file for d in chosen]):
            for disk in chosen:
                await self.qemu_img.snapshot_create(disk.file, name)
            self.store.add_snapshot(self.record.id, snap)
        return snap

    async def _create_internal_disk_only(
        self,
        name: str,
        chosen: Sequence[Disk],
        disks: Sequence[Disk],
        description: str,
        quiesce: bool,
    ) -> Snapshot:
        assert self.monitor is not None
        vm_state = await self.run_state()
        snap = self._new_snapshot(
            name,
            chosen=chosen,
            disks=disks,
            kind=SnapshotKind.INTERNAL,
            memory=MemoryKind.NONE,
            consistency=Consistency.QUIESCED if quiesce else Consistency.CRASH,
            vm_state=vm_state,
            description=description,
        )
        # One transaction: every disk is cut at the same instant (QEMU drains all of them).
        actions = [
            {
                "type": "blockdev-snapshot-internal-sync",
                "data": {"device": d.node_name, "name": name},
            }
            for d in chosen
        ]
        with self._journal(
            "create-internal",
            name=name,
            files=[d.file for d in chosen],
            nodes=[d.node_name for d in chosen],
        ):
            async with self._quiesced(quiesce):
                await self.monitor.execute("transaction", {"actions": actions})
            self.store.add_snapshot(self.record.id, snap)
        return snap

    async def _create_internal_checkpoint(
        self, name: str, chosen: Sequence[Disk], disks: Sequence[Disk], description: str
    ) -> Snapshot:
        assert self.monitor is not None
        vm_state = await self.run_state()
        snap = self._new_snapshot(
            name,
            chosen=chosen,
            disks=disks,
            kind=SnapshotKind.INTERNAL,
            memory=MemoryKind.INTERNAL,
            consistency=Consistency.FULL,
            vm_state=vm_state,
            description=description,
        )
        # snapshot-save stops the vCPUs for the whole RAM write and restarts them only if they
        # were running, so a VM the user had paused stays paused.
        with self._journal(
            "create-internal",
            name=name,
            files=[d.file for d in chosen],
            nodes=[d.node_name for d in chosen],
            paused_by_us=vm_state is VMState.RUNNING,
        ):
            await self.monitor.run_job(
                "snapshot-save",
                {
                    "tag": name,
                    "vmstate": chosen[0].node_name,
                    "devices": [d.node_name for d in chosen],
                },
                job_id=f"qemusnap-save-{os.getpid()}",
                timeout=DEFAULT_TIMEOUT,
            )
            self.store.add_snapshot(self.record.id, snap)
        return snap

    @contextlib.asynccontextmanager
    async def _quiesced(self, quiesce: bool) -> AsyncIterator[None]:
        if not quiesce:
            yield
            return
        assert self.qga_socket is not None
        async with (
            agent_mod.GuestAgent(self.qga_socket, timeout=QUIESCE_TIMEOUT) as guest,
            agent_mod.frozen(guest, timeout=QUIESCE_TIMEOUT),
        ):
            self.agent = guest
            try:
                yield
            finally:
                self.agent = None

    async def _halt(self) -> None:
        """``--halt``: the VM is shut off after the snapshot, as with virsh."""
        assert self.monitor is not None
        if self.machine is not None:
            await self.machine.shutdown()
        else:
            pid = self.monitor.peer_pid()
            await self.monitor.quit()
            if pid is not None:
                await wait_pid_exit(pid, 30.0)
        self.monitor = None

    # --- revert ---------------------------------------------------------------------------------

    async def revert(
        self,
        name: str,
        *,
        running: bool = False,
        paused: bool = False,
        force: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Snapshot:
        """Bring the VM back to snapshot ``name`` (SPEC "Revert")."""
        if running and paused:
            raise UnsupportedError("--running and --paused exclude each other")
        async with asyncio.timeout(timeout), self._operation(f"revert {name}"):
            snap = self.tree().get(name)
            if snap.kind is not SnapshotKind.INTERNAL:
                raise UnsupportedError("reverting external snapshots is not built yet")
            target = VMState.RUNNING if running else VMState.PAUSED if paused else None
            if self.monitor is None:
                await self._revert_internal_cold(snap)
            elif snap.memory is MemoryKind.INTERNAL:
                await self._revert_internal_checkpoint(snap, target or snap.vm_state)
            else:
                if not force:
                    raise UnsupportedError(
                        f"{name} is a disk-only snapshot: reverting a running VM to it restarts"
                        " QEMU and loses its current running state; add --force"
                    )
                await self._revert_disks_by_restart(snap, target or VMState.RUNNING)
            self.store.set_current(self.record.id, name)
        return self.tree().get(name)

    def _snapshot_disks(self, snap: Snapshot, disks: Sequence[Disk]) -> list[Disk]:
        wanted = {d.name for d in snap.disks if d.snapshot is not DiskSnapshotKind.EXCLUDED}
        return [d for d in disks if d.name in wanted]

    async def _revert_internal_cold(self, snap: Snapshot) -> None:
        disks = self._snapshot_disks(snap, await self.disks())
        for disk in disks:
            if await self.qemu_img.image_in_use(disk.file):
                raise ImageInUseError(
                    f"image {disk.file} (disk {disk.name}) is in use by a running QEMU:"
                    " use --qmp SOCKET to revert it live"
                )
        with self._journal("revert-internal", name=snap.name, files=[d.file for d in disks]):
            for disk in disks:
                await self.qemu_img.snapshot_apply(disk.file, snap.name)

    async def _revert_internal_checkpoint(self, snap: Snapshot, target: VMState) -> None:
        assert self.monitor is not None
        disks = self._snapshot_disks(snap, await self.disks())
        # snapshot-load pauses the vCPUs while loading and restarts them only if they were
        # running before: settle the final state ourselves afterwards.
        with self._journal("revert-internal", name=snap.name, files=[d.file for d in disks]):
            await self.monitor.run_job(
                "snapshot-load",
                {
                    "tag": snap.name,
                    "vmstate": disks[0].node_name,
                    "devices": [d.node_name for d in disks],
                },
                job_id=f"qemusnap-load-{os.getpid()}",
                timeout=DEFAULT_TIMEOUT,
            )
            await self._settle(target)

    async def _settle(self, target: VMState) -> None:
        assert self.monitor is not None
        status = await self.monitor.query_status()
        if target is VMState.RUNNING and not status.running:
            await self.monitor.cont()
        elif target is VMState.PAUSED and status.running:
            await self.monitor.stop()

    async def _revert_disks_by_restart(self, snap: Snapshot, target: VMState) -> None:
        """A disk-only snapshot of a running VM: its memory would not match the reverted disks,
        so QEMU is stopped, the disks reverted, and QEMU started again on them (a fresh boot)."""
        assert self.monitor is not None
        launch = self._relaunch_plan()
        disks = self._snapshot_disks(snap, await self.disks())
        with self._journal("revert-restart", name=snap.name, files=[d.file for d in disks]):
            await self._stop_qemu()
            for disk in disks:
                await self.qemu_img.snapshot_apply(disk.file, snap.name)
            await self._start_qemu(launch, {}, incoming=False)
            await self._settle(target)

    def _relaunch_plan(self) -> RecordedLaunch | Machine | RelaunchHook:
        """How this VM can be started again; refuse *before* stopping anything if unknown."""
        if self.relaunch_hook is not None:
            return self.relaunch_hook
        if self.machine is not None:
            return self.machine
        launch = self.store.vm(self.record.id).launch
        if launch and "argv" in launch:
            return RecordedLaunch.from_json(launch)
        raise UnsupportedError(
            "cannot restart this QEMU: its command line is unknown (attach by QMP socket path,"
            " or pass a relaunch hook)"
        )

    async def _stop_qemu(self) -> None:
        assert self.monitor is not None
        if self.machine is not None:
            await self.machine.shutdown()
        else:
            pid = self.monitor.peer_pid()
            await self.monitor.quit()
            await self.monitor.close()
            if pid is not None and not await wait_pid_exit(pid, 30.0):
                raise OperationTimeout(f"QEMU (pid {pid}) did not exit after quit")
        self.monitor = None

    async def _start_qemu(
        self,
        how: RecordedLaunch | Machine | RelaunchHook,
        new_files: dict[str, str],
        *,
        incoming: bool,
    ) -> None:
        """Start QEMU again (paused), with disks moved to ``new_files`` (disk name -> image)."""
        if isinstance(how, Machine):
            config = how.config
            if new_files:
                config = attrs.evolve(
                    config,
                    drives=tuple(
                        attrs.evolve(d, file=new_files.get(d.id, d.file)) for d in config.drives
                    ),
                )
            self.machine = Machine(config, paused=True, incoming=incoming, log_dir=str(how.log_dir))
            await self.machine.launch()
            self.monitor = self.machine.monitor
            self.store.set_vm_info(self.record.id, launch={"config": attrs.asdict(config)})
        elif isinstance(how, RecordedLaunch):
            old = {d.name: d.file for d in self.record.disks}
            launch = how.with_disks({old[n]: f for n, f in new_files.items() if n in old})
            log_file = self.store.memory_dir(self.record.id).parent / "qemu.log"
            _, self.monitor = await relaunch(launch, incoming=incoming, log_file=log_file)
            self.store.set_vm_info(self.record.id, launch=launch.to_json())
        else:
            self.monitor = await how(new_files, incoming)
        disks = await self.monitor.disks()
        self.store.set_disks(self.record.id, [DiskRecord(d.name, d.file, d.format) for d in disks])

    # --- delete ---------------------------------------------------------------------------------

    async def delete(
        self,
        name: str,
        *,
        children: bool = False,
        children_only: bool = False,
        metadata_only: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[str]:
        """Delete snapshot ``name`` (and/or its descendants); returns the names removed."""
        if children and children_only:
            raise UnsupportedError("--children and --children-only exclude each other")
        async with asyncio.timeout(timeout), self._operation(f"delete {name}"):
            tree = self.tree()
            plan = plan_delete(
                tree,
                name,
                children=children,
                children_only=children_only,
                metadata_only=metadata_only,
            )
            for victim in plan.remove:
                snap = tree.get(victim)
                if snap.kind is not SnapshotKind.INTERNAL and not metadata_only:
                    raise UnsupportedError("deleting external snapshots is not built yet")
            for victim in plan.remove:
                snap = tree.get(victim)
                if not metadata_only:
                    files = [d.file for d in snap.disks if d.file]
                    with self._journal("delete-internal", name=victim, files=files):
                        await self._delete_internal_tags(victim, files)
                        self.store.remove_snapshots(self.record.id, [victim], {})
                else:
                    self.store.remove_snapshots(self.record.id, [victim], {})
            self.store.remove_snapshots(self.record.id, [], plan.reparent)
        return list(plan.remove)

    async def _delete_internal_tags(self, name: str, files: Sequence[str]) -> None:
        """Remove tag ``name`` from the images that still hold it (idempotent, for recovery).

        Images QEMU has open go through the ``snapshot-delete`` job; the others (or all, cold)
        through ``qemu-img snapshot -d``.
        """
        nodes = {d.file: d.node_name for d in await self.monitor.disks()} if self.monitor else {}
        holding = [f for f in files if os.path.exists(f) and await self._has_tag(f, name)]
        in_qemu = [nodes[f] for f in holding if nodes.get(f)]
        if self.monitor is not None and in_qemu:
            await self.monitor.run_job(
                "snapshot-delete",
                {"tag": name, "devices": in_qemu},
                job_id=f"qemusnap-delete-{os.getpid()}",
                timeout=DEFAULT_TIMEOUT,
            )
        for file in holding:
            if file not in nodes:
                await self.qemu_img.snapshot_delete(file, name)

    async def _has_tag(self, file: str, name: str) -> bool:
        return any(
            s.name == name for s in await self.qemu_img.snapshot_list(file, force_share=self.live)
        )


# --- helpers ------------------------------------------------------------------------------------


async def _cold_disks(store: Store, paths: Sequence[str]) -> list[Disk]:
    """Disks of a stopped VM from image paths; names come from the store when it knows them."""
    qemu_img = QemuImg()
    disks: list[Disk] = []
    for path in paths:
        absolute = os.path.abspath(path)
        if not os.path.exists(absolute):
            raise DiskNotFoundError(f"no such disk image: {path}")
        infos = await qemu_img.info(absolute, backing_chain=False, force_share=True)
        known = store.find_vm([absolute])
        name = next((d.name for d in known.disks if d.file == absolute), None) if known else None
        disks.append(Disk(name or Path(absolute).stem, absolute, infos[0].format))
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise UnsupportedError(f"two disks would share a name: {names}")
    return disks


async def _find_or_add_vm(store: Store, disks: Sequence[Disk], *, live: bool) -> VMRecord:
    """The store's record of the VM with these disks, made if new, with active files updated."""
    qemu_img = QemuImg()
    files: list[str] = []
    for disk in disks:
        if disk.read_only:
            continue
        chain = await qemu_img.chain(disk.name, disk.file, force_share=True)
        files.extend(image.filename for image in chain.images)
    writable = [d for d in disks if not d.read_only]
    record = store.find_vm([d.file for d in writable]) or store.find_vm(files)
    records = [DiskRecord(d.name, d.file, d.format) for d in writable]
    if record is None:
        name = Path(writable[0].file).stem if writable else "vm"
        return store.add_vm(name, records, files)
    if live or not record.disks:
        store.set_disks(record.id, records)
    return store.vm(record.id)
