"""The engine: snapshot operations on one VM, live (QMP) or cold (qemu-img).

A :class:`VM` is the handle callers hold.  It is opened one of three ways:

* :meth:`VM.attach` — a running QEMU, by its QMP socket path (or a connected :class:`Monitor`);
* :meth:`VM.launch` — a QEMU qemusnap starts from a :class:`MachineConfig` (and owns);
* :meth:`VM.cold` — the disk images of a VM that is not running.

Every mutating operation takes the VM's cross-process lock, first repairs what an interrupted
earlier operation left (the journal), and journals itself before its first irreversible step.
An operation that fails is rolled back by the very code that repairs a crashed one
(:meth:`VM._recover_entry`), so both paths stay honest.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from . import agent as agent_mod
from . import hostmem, process
from .aio import deadline
from .errors import (
    CommandError,
    DiskNotFoundError,
    ImageInUseError,
    OperationError,
    OperationTimeout,
    SnapshotExistsError,
    TargetExistsError,
    UnsupportedError,
)
from .faults import crashpoint
from .machine import (
    Machine,
    MachineConfig,
    RecordedLaunch,
    image_paths_in_argv,
    relaunch,
    wait_pid_exit,
)
from .memory import FdTransport, Progress, cancel_migration
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
from .monitor import Monitor, QMPClient
from .plan import (
    Commit,
    ImageGraph,
    Pull,
    Rebind,
    Remove,
    Step,
    dead_images,
    file_part,
    overlay_path,
    plan_merge_away,
)
from .qemu_img import QemuImg
from .store import DiskRecord, Store, VMLock, VMRecord, default_state_dir, utc_now
from .tree import SnapshotTree, plan_delete, validate_name

log = logging.getLogger("qemusnap.engine")

#: A caller-supplied way to start the VM again after a revert: gets the active image of each
#: disk (by disk name) and whether memory will be loaded (``-incoming defer`` wanted); returns a
#: connected Monitor of the new, paused QEMU.
RelaunchHook = Callable[[dict[str, str], bool], Awaitable[Monitor]]
#: Starts QEMU again (paused; ``incoming``: waiting for memory state), prepared beforehand.
Starter = Callable[[bool], Awaitable[None]]

DEFAULT_TIMEOUT = 300.0
#: How long an operation waits for another one on the same VM ($QEMUSNAP_LOCK_TIMEOUT).
LOCK_TIMEOUT = float(os.environ.get("QEMUSNAP_LOCK_TIMEOUT", "30"))
QUIESCE_TIMEOUT = 10.0
RECOVERY_TIMEOUT = 120.0
_job_numbers = itertools.count(1)


def _job_id(kind: str) -> str:
    return f"qemusnap-{kind}-{os.getpid()}-{next(_job_numbers)}"


class _Journal:
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
        self.memory = FdTransport()
        #: The guest-agent connection while the guest is quiesced (None otherwise).
        self.agent: agent_mod.GuestAgent | None = None

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
        """
        if isinstance(qmp, str):
            qmp = os.path.abspath(qmp)
            await _wait_until_free(state_dir, qmp)
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
        store = Store(state_dir)
        try:
            disks = await asyncio.wait_for(monitor.disks(), timeout)
            record = await _find_or_add_vm(store, disks)
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
            if monitor is not qmp:
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
        return vm

    @classmethod
    async def cold(
        cls,
        disks: Sequence[str] = (),
        *,
        state_dir: str | os.PathLike[str] | None = None,
        relaunch_hook: RelaunchHook | None = None,
        timeout: float = 60.0,
    ) -> VM:
        """Open the disk images of a VM that is not running.

        A disk the state directory knows (any image of its chain, the original base included)
        names its VM, whose disks then come from the store; with no disks, the state directory
        must know exactly one VM.
        """
        store = Store(state_dir)
        try:
            record = await asyncio.wait_for(_cold_record(store, disks), timeout)
        except BaseException:
            store.close()
            raise
        return cls(store, record, relaunch_hook=relaunch_hook)

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

    @property
    def _owner(self) -> tuple[int, int] | None:
        """(uid, gid) of the user QEMU runs as, when not us: the files made for it are theirs."""
        launch = self.store.vm(self.record.id).launch
        return RecordedLaunch.from_json(launch).owner if launch and "argv" in launch else None

    # --- inspection ---------------------------------------------------------------------------

    async def disks(self, *, timeout: float = 30.0) -> list[Disk]:
        """The VM's writable disks now (live: from QEMU; cold: from the store)."""
        if self.monitor is not None:
            return [d for d in await self.monitor.disks(timeout=timeout) if not d.read_only]
        return [Disk(d.name, d.file, d.format) for d in self.store.vm(self.record.id).disks]

    @staticmethod
    def _disk(disks: Sequence[Disk], name: str) -> Disk:
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
                if repair is not None and await self.qemu_img.image_in_use(
                    image.filename, for_write=True
                ):
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

    @contextlib.asynccontextmanager
    async def _journal(self, operation: str, **data: Any) -> AsyncIterator[_Journal]:
        """Journal one operation.  If it fails, roll it back with the recovery code (shielded,
        with its own deadline) and only then drop the entry; a failed rollback keeps it for the
        next command."""
        entry = _Journal(self.store, self.record.id, operation, data)
        try:
            yield entry
        except BaseException as exc:
            try:
                await asyncio.shield(self._rollback(operation, entry))
            except Exception as undo:
                exc.add_note(f"rollback failed, `qemusnap recover` will retry: {undo}")
                log.warning("rollback of %s failed: %s", operation, undo)
            raise
        self.store.journal_end(entry.id)

    async def _rollback(self, operation: str, entry: _Journal) -> None:
        async with asyncio.timeout(RECOVERY_TIMEOUT):
            await self._recover_entry(operation, entry.data, entry)
        self.store.journal_end(entry.id)

    async def _recover_pending(self) -> None:
        """Repair what an interrupted operation left behind."""
        for entry in self.store.journal(self.record.id):
            log.warning("repairing interrupted %s of %s", entry.operation, entry.data.get("name"))
            async with asyncio.timeout(RECOVERY_TIMEOUT):
                journal = _Journal(
                    self.store, self.record.id, entry.operation, entry.data, id=entry.id
                )
                await self._recover_entry(entry.operation, entry.data, journal)
            self.store.journal_end(entry.id)

    async def recover(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Finish or roll back whatever an interrupted qemusnap left (also done by every
        operation before it starts)."""
        async with deadline(timeout, "recover"), self._operation("recover"):
            pass

    async def _recover_entry(
        self, operation: str, data: dict[str, Any], journal: _Journal | None = None
    ) -> None:
        """Bring VM, images and store back to a consistent state after ``operation`` stopped
        part-way: a snapshot is complete and listed, or absent with its files removed."""
        name = data.get("name", "")
        listed = self.store.has_snapshot(self.record.id, name)
        if self.monitor is not None:
            await self._stop_leftovers()
        match operation:
            case "create-internal" if not listed:
                await self._delete_internal_tags(name, data["files"])
            case "delete-internal" if listed:
                await self._delete_internal_tags(name, data["files"])
                self.store.remove_snapshots(self.record.id, [name], data.get("reparent", {}))
            case "create-external" if not listed and data.get("memory_written"):
                await self._finish_checkpoint(data)
            case "create-external" if not listed:
                await self._undo_overlays(data.get("overlays", []))
                self._remove_created([data.get("memory_file")] if data.get("memory_made") else [])
            case "delete-external" if listed:
                await self._delete_external(self.tree().get(name), journal)
                self.store.remove_snapshots(self.record.id, [], data.get("reparent", {}))
            case "revert" | "restore":
                await self._recover_restart(data, journal)
            case "save":
                if data.get("written") and self.monitor is None:
                    with self.store.atomic():
                        self.store.set_saved(self.record.id, data["saved"])
                        self.store.add_file(self.record.id, data["file"], owned=False, role="save")
                else:
                    # QEMU still runs (the save did not finish: roll it back, and resume the
                    # VM if it ran; once the state was written the journal no longer counts
                    # it as paused by us), or QEMU died before the state was all written (a
                    # partial file nobody may restore from).
                    self._remove_created([data["file"]] if data.get("made") else [])
                    if (
                        self.monitor is not None
                        and data.get("written")
                        and data["saved"]["vm_state"] == str(VMState.RUNNING)
                    ):
                        await self._settle(VMState.RUNNING)
        if data.get("paused_by_us") and self.monitor is not None:
            status = await self.monitor.query_status()
            if status.status in ("paused", "postmigrate"):
                await self.monitor.cont()

    async def _stop_leftovers(self) -> None:
        """Stop what the interrupted process left running inside QEMU before repairing:
        QEMU goes on with a migration or a job when its client dies.

        Its migration is cancelled; one that completed left QEMU in "postmigrate", with its
        images inactivated (no block job, no snapshot works on them): ``cont`` + ``stop``
        makes them usable, the VM paused.  Its block jobs are cancelled (a commit or stream
        cancelled half-way leaves every image reading the same data; the step is run again).
        Its other jobs (``snapshot-save``/``-load``/``-delete``, not cancellable half-way) are
        waited for, so that no snapshot tag appears after the repair, and dismissed."""
        assert self.monitor is not None
        await cancel_migration(self.monitor)
        for job in await self.monitor.execute("query-block-jobs"):
            if str(job.get("device", "")).startswith("qemusnap-"):
                with contextlib.suppress(CommandError):
                    await self.monitor.execute(
                        "block-job-cancel", {"device": job["device"], "force": True}
                    )
        while True:
            ours = [
                job
                for job in await self.monitor.execute("query-jobs")
                if str(job.get("id", "")).startswith("qemusnap-")
            ]
            for job in ours:
                if job.get("status") == "concluded":
                    with contextlib.suppress(CommandError):
                        await self.monitor.execute("job-dismiss", {"id": job["id"]})
            if all(job.get("status") in ("concluded", "null") for job in ours):
                break
            await asyncio.sleep(0.05)
        await self.monitor.wait_status_not("finish-migrate", timeout=30.0)
        await self._repause_after_save()

    async def _recover_restart(self, data: dict[str, Any], journal: _Journal | None) -> None:
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
        if self.monitor is None and data.get("stopped"):
            await self._reapply_internal(data)
            start = await self._prepare_restart(overlays)
            await start(bool(data.get("memory")))
            if journal is not None:
                journal.update(started=True)  # a recovery interrupted now finds it started
            data["started"] = True
        if self.monitor is not None and (data.get("started") or data.get("loading")):
            disks = await self.monitor.disks()
            if all(d.file == overlays.get(d.name, d.file) for d in disks):
                await self._finish_start(data)
                self._adopt_disks(disks, overlays, owned=overlays.values())
                if data.get("name"):
                    self.store.set_current(self.record.id, data["name"])
                self._discard_abandoned(data.get("old", []))
                return
        in_use = {d.file for d in await self.disks()} if self.monitor is not None else set()
        self._remove_created([p for p in overlays.values() if p not in in_use])

    async def _reapply_internal(self, data: dict[str, Any]) -> None:
        """Redo the cold part of an internal revert that restarts QEMU: ``qemu-img snapshot
        -a`` on each holder, then the tag removed from the clones.  A clone without the tag
        was done already (the tag goes only after the apply); applying twice is harmless."""
        if not data.get("apply"):
            return
        name = data["name"]
        for holder in data.get("holders", []):
            if os.path.exists(holder) and any(t.name == name for t in await self._tags(holder)):
                await self.qemu_img.snapshot_apply(holder, name)
        await self._delete_internal_tags(name, list(data.get("overlays", {}).values()))

    async def _finish_start(self, data: dict[str, Any]) -> None:
        """A restarted QEMU the interrupted operation left waiting: load its memory state
        (``-incoming defer``) or its internal checkpoint (``snapshot-load``, still to do if
        not journaled as done), then settle the run state the operation wanted."""
        assert self.monitor is not None
        status = (await self.monitor.query_status()).status
        name = data.get("name")
        target = VMState(data["target"]) if data.get("target") else None
        if status == "inmigrate":
            snap = self.tree().get(name) if name else None
            memory = snap.memory_file if snap else data.get("file")
            if memory is None:
                raise OperationError("a restarted QEMU waits for memory state nobody knows")
            await self.memory.load(self.monitor, memory, timeout=DEFAULT_TIMEOUT)
            target = target or (snap.vm_state if snap else VMState.RUNNING)
        elif data.get("load") and not data.get("loaded"):
            await self._load_internal(data["name"], data["holders"])
            await self._delete_internal_tags(data["name"], list(data.get("overlays", {}).values()))
        if target is not None or status in ("inmigrate", "prelaunch"):
            await self._settle(target or VMState.RUNNING)

    async def _finish_checkpoint(self, data: dict[str, Any]) -> None:
        """An external checkpoint whose disks were cut and whose memory file was written (and
        synced): the snapshot is complete, only the run state and the store's records are
        missing.  Finish it: rolling back would throw a complete snapshot away, and would
        have to block-commit the overlays of a QEMU whose images the migration inactivated."""
        # QEMU was made usable again (see _stop_leftovers); a VM we paused is resumed at the end
        # of the recovery, one the user had paused stays paused.
        snap = _snapshot_from_json(data["snapshot"])
        disks = [Disk(d["name"], d["file"], d["format"]) for d in data["disks"]]
        overlays = data.get("overlays", [])
        with self.store.atomic():
            self.store.add_snapshot(self.record.id, snap)
            self._adopt_disks(
                disks,
                {o["disk"]: o["path"] for o in overlays},
                owned=[o["path"] for o in overlays if o.get("made")],
            )
            self.store.add_file(self.record.id, data["memory_file"], owned=True, role="memory")

    def _remove_created(self, paths: Iterable[str | None]) -> None:
        """Unlink files this operation created, unless the store now relies on them."""
        needed = self._referenced_files()
        for path in paths:
            if path and path not in needed and os.path.lexists(path):
                os.unlink(path)
                self.store.forget_file(self.record.id, path)

    def _referenced_files(self) -> set[str]:
        """Every file a snapshot or a disk of this VM relies on, per the store."""
        files = {d.file for d in self.store.vm(self.record.id).disks}
        for snap in self.store.snapshots(self.record.id):
            files.update(d.file for d in snap.disks if d.file)
            if snap.memory_file:
                files.add(snap.memory_file)
        return files

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
        progress: Progress | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Snapshot:
        """Take snapshot ``name`` (SPEC "Create" tells what each combination means).

        As with virsh: no flags on a running VM is an internal checkpoint, on a stopped VM
        internal disk snapshots; ``disk_only`` alone is an external disk-only snapshot;
        ``memory_file`` (or ``internal=False`` on a running VM) an external checkpoint.
        """
        validate_name(name)
        exclude, overlays = set(exclude), dict(overlays or {})
        external = internal is False or memory_file is not None or (disk_only and not internal)
        with_memory = self.live and not disk_only
        self._check_create_flags(
            external, with_memory, internal, memory_file, live, quiesce, overlays, reuse_external
        )
        async with deadline(timeout, f"create {name}"), self._operation(f"create {name}"):
            if self.store.has_snapshot(self.record.id, name):
                raise SnapshotExistsError(f"a snapshot named {name!r} exists already")
            disks = await self.disks()
            for disk_name in [*exclude, *overlays]:
                self._disk(disks, disk_name)
            chosen = [d for d in disks if d.name not in exclude]
            if not chosen:
                raise UnsupportedError("no disk left to snapshot")
            if not self.live:
                await self._refuse_in_use(chosen, "use --qmp SOCKET for a live snapshot")
            if external:
                snap = await self._create_external(
                    name, chosen, disks, description, with_memory, memory_file, live, quiesce,
                    overlays, reuse_external, halt, progress,
                )  # fmt: skip
            else:
                snap = await self._create_internal(name, chosen, disks, description, with_memory,
                                                   quiesce)  # fmt: skip
            if halt and self.monitor is not None:
                await self._stop_qemu()
        return snap

    def _check_create_flags(
        self,
        external: bool,
        with_memory: bool,
        internal: bool | None,
        memory_file: str | None,
        live: bool,
        quiesce: bool,
        overlays: dict[str, str],
        reuse_external: bool,
    ) -> None:
        if internal and memory_file is not None:
            raise UnsupportedError("--internal and --memory-file exclude each other")
        if memory_file is not None and not self.live:
            raise UnsupportedError(
                "--memory-file needs a running VM (--qmp): a stopped VM has no memory"
            )
        if live and not (external and with_memory):
            raise UnsupportedError("--live applies to external checkpoints (--memory-file)")
        if (overlays or reuse_external) and not external:
            raise UnsupportedError("--overlay and --reuse-external apply to external snapshots")
        if reuse_external and not overlays:
            raise UnsupportedError("--reuse-external needs --overlay DISK=PATH for each disk")
        if quiesce and with_memory:
            raise UnsupportedError(
                "--quiesce applies to disk-only snapshots (a checkpoint saves memory too)"
            )
        if quiesce and not self.live:
            raise UnsupportedError("--quiesce needs a running VM (--qmp) and its guest agent")
        if quiesce and not self.qga_socket:
            raise UnsupportedError("--quiesce needs the guest agent socket (--qga SOCKET)")

    async def _refuse_in_use(self, disks: Sequence[Disk], hint: str) -> None:
        for disk in disks:
            if await self.qemu_img.image_in_use(disk.file):
                raise ImageInUseError(
                    f"image {disk.file} (disk {disk.name}) is in use by a running QEMU: {hint}"
                )

    def _new_snapshot(
        self,
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
    ) -> Snapshot:
        """The record of a new snapshot; ``files``: disk name -> image holding its data."""
        disk_kind = DiskSnapshotKind(str(kind))
        return Snapshot(
            name=name,
            parent=self.store.vm(self.record.id).current,
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
        )

    # --- create: internal -----------------------------------------------------------------------

    async def _create_internal(
        self,
        name: str,
        chosen: Sequence[Disk],
        disks: Sequence[Disk],
        description: str,
        with_memory: bool,
        quiesce: bool,
    ) -> Snapshot:
        for disk in chosen:
            if disk.format != "qcow2":
                raise UnsupportedError(
                    f"disk {disk.name} ({disk.file}) is {disk.format}: only qcow2 images can"
                    " hold internal snapshots (use --disk-only for an external snapshot)"
                )
            if any(s.name == name for s in await self._tags(disk.file)):
                raise SnapshotExistsError(
                    f"image {disk.file} (disk {disk.name}) already holds an internal"
                    f" snapshot named {name!r}"
                )
        vm_state = await self.run_state()
        snap = self._new_snapshot(
            name,
            files={d.name: d.file for d in chosen},
            disks=disks,
            kind=SnapshotKind.INTERNAL,
            memory=MemoryKind.INTERNAL if with_memory else MemoryKind.NONE,
            quiesced=quiesce,
            vm_state=vm_state,
            description=description,
        )
        nodes = [d.node_name for d in chosen]
        async with self._journal(
            "create-internal",
            name=name,
            files=[d.file for d in chosen],
            paused_by_us=with_memory and vm_state is VMState.RUNNING,
        ) as journal:
            if self.monitor is None:
                for disk in chosen:
                    await self.qemu_img.snapshot_create(disk.file, name)
            elif with_memory:
                # snapshot-save stops the vCPUs for the whole RAM write and restarts them only
                # if they were running: a VM the user had paused stays paused.
                await self.monitor.run_job(
                    "snapshot-save",
                    {"tag": name, "vmstate": nodes[0], "devices": nodes},
                    job_id=_job_id("save"),
                    timeout=DEFAULT_TIMEOUT,
                )
            else:
                # One transaction: every disk is cut at the same instant.
                actions = [
                    {"type": "blockdev-snapshot-internal-sync", "data": {"device": n, "name": name}}
                    for n in nodes
                ]
                async with self._quiesced(quiesce):
                    await self.monitor.execute("transaction", {"actions": actions})
            journal.passed("taken")
            self.store.add_snapshot(self.record.id, snap)
        return snap

    @contextlib.asynccontextmanager
    async def _quiesced(self, quiesce: bool) -> AsyncIterator[None]:
        """Guest filesystems frozen (qemu-guest-agent) for the body, thawed on every exit."""
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

    async def _tags(self, file: str) -> list[Any]:
        return list(await self.qemu_img.snapshot_list(file, force_share=self.live))

    # --- create: external -----------------------------------------------------------------------

    async def _create_external(
        self,
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
        plan = [(disk, await self._overlay_for(disk, name, overlays, reuse)) for disk in chosen]
        memory_path = None
        if with_memory:
            memory_path = os.path.abspath(
                memory_file
                or str(self.store.memory_dir(self.record.id) / f"{file_part(name, 200)}.mem")
            )
            if os.path.lexists(memory_path):
                raise TargetExistsError(f"{memory_path} exists already (it is never overwritten)")
        vm_state = await self.run_state()
        snap = self._new_snapshot(
            name,
            files={d.name: d.file for d in chosen},
            disks=disks,
            kind=SnapshotKind.EXTERNAL,
            memory=MemoryKind.FILE if with_memory else MemoryKind.NONE,
            memory_file=memory_path,
            quiesced=quiesce,
            vm_state=vm_state,
            description=description,
        )
        made = [path for disk, path in plan if not (reuse and disk.name in overlays)]
        # The snapshot's record and the disks go into the journal: once the memory file is
        # written the snapshot is complete, and recovery records it instead of undoing it.
        async with self._journal(
            "create-external",
            name=name,
            overlays=[{"disk": d.name, "path": p, "made": p in made} for d, p in plan],
            memory_file=memory_path,
            snapshot=snap.to_json(),
            disks=[d.to_json() for d in disks],
        ) as journal:
            for disk, path in plan:
                if path in made:
                    await self.qemu_img.create(
                        path, backing=disk.file, backing_fmt=disk.format, owner=self._owner
                    )
            journal.passed("overlays-made")
            if self.monitor is not None:
                pausing = with_memory and vm_state is VMState.RUNNING
                async with self._overlay_nodes(plan) as nodes:
                    journal.passed("nodes-added")
                    if memory_path is None:
                        async with self._quiesced(quiesce):
                            await self._cut_to_overlays(plan, nodes)
                        journal.passed("cut")
                    else:
                        journal.update(memory_made=True)
                        await self._checkpoint(
                            plan, nodes, memory_path, pausing=pausing,
                            live=live and pausing, progress=progress, journal=journal,
                        )  # fmt: skip
                if pausing and not halt:
                    await self._settle(VMState.RUNNING)
                elif memory_path is not None and not halt:
                    await self._repause_after_save()
            with self.store.atomic():
                self.store.add_snapshot(self.record.id, snap)
                self._adopt_disks(disks, {d.name: p for d, p in plan}, owned=made)
                if memory_path is not None:
                    self.store.add_file(self.record.id, memory_path, owned=True, role="memory")
            if halt and self.monitor is not None:
                # Still journaled: killed before QEMU is gone, recovery resumes the VM that
                # was paused for the checkpoint (the snapshot is complete and stays).
                await self._stop_qemu()
        return snap

    async def _repause_after_save(self) -> None:
        """After saving RAM of a VM the user had paused, QEMU 7.2 leaves it in "postmigrate"
        with its images inactivated: no block job and no further migration work until a
        ``cont``.  There is no way back to "paused" without running (blockdev-set-active is
        QEMU 10), so: ``cont`` then ``stop`` at once; the snapshot is not affected, the guest
        runs for a moment and ends paused, as the user left it."""
        assert self.monitor is not None
        if (await self.monitor.query_status()).status == "postmigrate":
            await self.monitor.cont()
            await self.monitor.stop()

    async def _overlay_for(
        self, disk: Disk, name: str, overlays: dict[str, str], reuse: bool
    ) -> str:
        """The overlay of ``disk``: chosen (``--overlay``), reused, or the default beside it."""
        if disk.name not in overlays:
            base = (await self.qemu_img.chain(disk.name, disk.file, force_share=True)).base
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
        (info,) = await self.qemu_img.info(path, backing_chain=False, force_share=True)
        if info.format != "qcow2" or info.backing_filename != disk.file:
            raise UnsupportedError(
                f"--reuse-external: {path} must be a qcow2 image whose backing file is"
                f" {disk.file} (it is {info.format}, backed by {info.backing_filename})"
            )
        return path

    @contextlib.asynccontextmanager
    async def _overlay_nodes(self, plan: Sequence[tuple[Disk, str]]) -> AsyncIterator[list[str]]:
        """``blockdev-add`` each overlay (before any pause: opening files takes time); on
        failure, the nodes not yet installed are deleted again."""
        assert self.monitor is not None
        added: list[str] = []
        try:
            for _, path in plan:
                node = f"qs-{secrets.token_hex(6)}"
                # blockdev-snapshot wants an overlay without a backing ("backing": null): it
                # installs the current node under it.  QEMU never touches an existing file
                # here (unlike blockdev-snapshot-sync, which would overwrite one).
                await self.monitor.execute(
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
                installed = {d.node_name for d in await self.disks()}
                for node in added:
                    if node not in installed:
                        with contextlib.suppress(OperationError):
                            await asyncio.shield(
                                self.monitor.execute("blockdev-del", {"node-name": node})
                            )
            raise

    async def _cut_to_overlays(
        self, plan: Sequence[tuple[Disk, str]], nodes: Sequence[str]
    ) -> None:
        """One ``transaction`` of ``blockdev-snapshot``: every disk cut at the same instant."""
        assert self.monitor is not None
        actions = [
            {"type": "blockdev-snapshot", "data": {"node": disk.node_name, "overlay": node}}
            for (disk, _), node in zip(plan, nodes, strict=True)
        ]
        await self.monitor.execute("transaction", {"actions": actions})

    async def _checkpoint(
        self,
        plan: Sequence[tuple[Disk, str]],
        nodes: Sequence[str],
        memory_path: str,
        *,
        pausing: bool,
        live: bool,
        progress: Progress | None,
        journal: _Journal,
    ) -> None:
        """Disks and RAM at one instant: ``stop``, the disk cut, ``migrate``.

        Everything else (overlay nodes, the memory file and its fd, migration settings) was
        prepared before the pause.  With ``live`` (background-snapshot) QEMU restarts the
        guest by itself right after the migration setup: the pause is short, and does not
        grow with RAM size when guest RAM is on huge pages (:mod:`qemusnap.hostmem`).
        Without it, the guest stays stopped for the whole RAM write.
        """
        assert self.monitor is not None
        if live:
            pid = self.machine.pid if self.machine is not None else self.monitor.peer_pid()
            if pid is not None:
                await asyncio.to_thread(hostmem.collapse_guest_ram, pid)
        async with self.memory.saving(
            self.monitor, memory_path, live=live, owner=self._owner
        ) as saver:
            if pausing:
                journal.update(paused_by_us=True)  # before the pause: recovery resumes it
                await self.monitor.stop()
                journal.passed("paused")
            await self._cut_to_overlays(plan, nodes)
            journal.passed("cut")
            await saver.run(timeout=DEFAULT_TIMEOUT, progress=progress)
            journal.update(memory_written=True)
            journal.passed("memory-written")
        # "cont" right after "completed" can fail with "Migration is not finalized yet":
        # wait for the run state to leave finish-migrate.
        await self.monitor.wait_status_not("finish-migrate", timeout=30.0)

    async def _undo_overlays(self, overlays: Sequence[dict[str, Any]]) -> None:
        """Roll back an external create: a disk already switched to its new overlay is committed
        back (active ``block-commit``, pivot), so nothing the guest wrote is lost; then the
        overlay files qemusnap made are removed."""
        if self.monitor is not None:
            paths = {o["path"] for o in overlays}
            for disk in await self.disks():
                if disk.file in paths and disk.node_name:
                    nodes = await self._live_nodes()
                    (info,) = await self.qemu_img.info(disk.file, backing_chain=False,
                                                       force_share=True)  # fmt: skip
                    base = info.backing_filename
                    if base is not None and base in nodes:
                        job = _job_id("undo")
                        await self.monitor.run_block_job(
                            "block-commit",
                            {"job-id": job, "device": disk.node_name, "base-node": nodes[base]},
                            job_id=job,
                            timeout=DEFAULT_TIMEOUT,
                        )
            for node in await self.monitor.query_named_block_nodes():
                if node.get("file") in paths and node.get("drv") == "qcow2":
                    with contextlib.suppress(OperationError):
                        await self.monitor.execute("blockdev-del", {"node-name": node["node-name"]})
            # Attaching to this QEMU recorded the overlays as the disks' active images (the cut
            # had happened): record the images the disks run on again now, or the overlays
            # would count as needed and stay behind as orphans.
            self._adopt_disks(await self.disks(), {})
        else:
            # No QEMU: it may have died after the cut, with guest writes in the overlays that
            # its last users were told were done.  Commit them back (a no-op for an overlay
            # nothing wrote to) rather than lose them with the files.
            for overlay in overlays:
                if overlay.get("made") and os.path.exists(overlay["path"]):
                    await self.qemu_img.commit(overlay["path"], keep_top=True)
        self._remove_created([o["path"] for o in overlays if o.get("made")])

    def _adopt_disks(
        self, disks: Sequence[Disk], new_files: dict[str, str], *, owned: Iterable[str] = ()
    ) -> None:
        """Record the disks' active images after they moved to ``new_files``."""
        owned = set(owned)
        with self.store.atomic():
            self.store.set_disks(
                self.record.id,
                [
                    DiskRecord(d.name, new_files.get(d.name, d.file),
                               "qcow2" if d.name in new_files else d.format)
                    for d in disks
                ],
            )  # fmt: skip
            for path in new_files.values():
                if path in owned or self.store.is_owned(self.record.id, path):
                    self.store.add_file(self.record.id, path, owned=True, role="overlay")
                else:
                    self.store.add_file(self.record.id, path, owned=False, role="overlay")

    async def _live_nodes(self) -> dict[str, str]:
        """Image file -> node name of its format node, for every image QEMU has open."""
        assert self.monitor is not None
        nodes: dict[str, str] = {}
        for node in await self.monitor.query_named_block_nodes():
            if node.get("drv") not in ("file", "host_device", "host_cdrom") and node.get("file"):
                nodes.setdefault(str(node["file"]), str(node["node-name"]))
        return nodes

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
        """Bring the VM back to snapshot ``name`` (SPEC "Revert").

        A checkpoint comes back in the run state it was taken in unless ``running``/``paused``
        say otherwise.  Reverting a running VM to a disk-only snapshot restarts QEMU on the
        reverted disks (its running state is lost): that needs ``force``.
        """
        if running and paused:
            raise UnsupportedError("--running and --paused exclude each other")
        requested = VMState.RUNNING if running else VMState.PAUSED if paused else None
        async with deadline(timeout, f"revert {name}"), self._operation(f"revert {name}"):
            snap = self.tree().get(name)
            if self.live and not snap.is_checkpoint and not force:
                raise UnsupportedError(
                    f"{name} is a disk-only snapshot: reverting a running VM to it restarts"
                    " QEMU and loses its current running state; add --force"
                )
            disks = await self.disks()
            if snap.kind is SnapshotKind.INTERNAL:
                await self._revert_internal(snap, disks, requested)
            else:
                await self._revert_external(snap, disks, requested)
            self.store.set_current(self.record.id, name)
        return self.tree().get(name)

    def _targets(self, snap: Snapshot, disks: Sequence[Disk]) -> list[tuple[Disk, str]]:
        """(disk now, image holding the snapshot's data) for each disk the snapshot covers."""
        by_name = {d.name: d for d in disks}
        return [
            (by_name[d.name], d.file)
            for d in snap.disks
            if d.snapshot is not DiskSnapshotKind.EXCLUDED and d.file and d.name in by_name
        ]

    async def _revert_internal(
        self, snap: Snapshot, disks: Sequence[Disk], requested: VMState | None
    ) -> None:
        """In place where the image holding the snapshot is still the disk's active image: a
        checkpoint with ``snapshot-load`` (same QEMU), disks with ``qemu-img snapshot -a``.

        An image a later external snapshot froze must not change (that snapshot reads it), so
        it is cloned first and the clone reverted: a new branch, like any external revert.
        """
        targets = self._targets(snap, disks)
        clones: dict[str, str] = {}
        for disk, file in targets:
            if file != disk.file:
                base = (await self.qemu_img.chain(disk.name, file, force_share=True)).base
                clones[disk.name] = overlay_path(file, base.filename, snap.name)
        live = self.monitor is not None
        # Cold, a checkpoint comes back in the run state it was taken in when qemusnap knows
        # how to start the VM: QEMU starts paused (-S) and loads it in place.
        can_start = not live and snap.memory is MemoryKind.INTERNAL and self._knows_launch()
        in_place = snap.memory is MemoryKind.INTERNAL and (live or can_start)
        start = None
        if (live and (clones or not in_place)) or can_start:
            start = await self._prepare_restart(clones)
        if self.monitor is None:
            await self._refuse_in_use(disks, "use --qmp SOCKET to revert it live")
        old = [d.file for d in disks]
        holders = [clones.get(disk.name, disk.file) for disk, _ in targets]
        target = requested or (snap.vm_state if in_place else VMState.RUNNING)
        # Recovery finishes a revert whose QEMU is already gone (stopped) or restarted: it must
        # know what is left to do (``qemu-img snapshot -a`` on the holders, or a snapshot-load
        # in the new QEMU), the run state wanted, and the images the revert abandons.
        async with self._journal(
            "revert", name=snap.name, overlays=clones, old=old, target=str(target),
            holders=holders, apply=not in_place, load=in_place,
        ) as journal:  # fmt: skip
            for disk, file in targets:
                if disk.name in clones:
                    await self._clone(file, clones[disk.name], keep_tag=snap.name)
            journal.passed("overlays-made")
            if start is not None and self.monitor is not None:
                await self._stop_qemu()
                journal.update(stopped=True)
                journal.passed("stopped")
            if not in_place:
                for holder in holders:
                    await self.qemu_img.snapshot_apply(holder, snap.name)
                await self._delete_internal_tags(snap.name, list(clones.values()))
            if start is not None:
                await start(False)
                journal.update(started=True)
                journal.passed("started")
            if in_place:
                # QEMU finishes a snapshot-load job even if we die: recovery (which waits for
                # it) must then treat the revert as done, and loads again to be sure.
                journal.update(loading=True)
                await self._load_internal(snap.name, holders)
                journal.update(loaded=True)
                journal.passed("loaded")
                await self._delete_internal_tags(snap.name, list(clones.values()))
            if self.monitor is not None:
                await self._settle(target)
            if clones:
                self._adopt_disks(disks, clones, owned=clones.values())
        self._discard_abandoned(old)

    async def _load_internal(self, name: str, holders: Sequence[str]) -> None:
        """``snapshot-load`` of internal checkpoint ``name`` from the images ``holders``."""
        assert self.monitor is not None
        # snapshot-load pauses the vCPUs while loading and restarts them only if they were
        # running: the caller settles the final run state.
        nodes = {d.file: d.node_name for d in await self.disks()}
        await self.monitor.run_job(
            "snapshot-load",
            {"tag": name, "vmstate": nodes[holders[0]], "devices": [nodes[h] for h in holders]},
            job_id=_job_id("load"),
            timeout=DEFAULT_TIMEOUT,
        )

    async def _clone(self, source: str, target: str, *, keep_tag: str) -> None:
        """A private copy of a frozen image (sparse, reflinked where the filesystem can), with
        only the internal snapshot ``keep_tag`` left in it."""
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        if self._owner is not None:
            os.fchown(fd, *self._owner)
        os.close(fd)
        self.store.add_file(self.record.id, target, owned=True, role="overlay")
        await process.run(
            ["cp", "--sparse=always", "--reflink=auto", source, target], timeout=DEFAULT_TIMEOUT
        )
        for tag in await self.qemu_img.snapshot_list(target):
            if tag.name != keep_tag:
                await self.qemu_img.snapshot_delete(target, tag.name)

    async def _revert_external(
        self, snap: Snapshot, disks: Sequence[Disk], requested: VMState | None
    ) -> None:
        """Fresh overlays on top of the snapshot's images (a branch: no image another snapshot
        depends on is ever written); QEMU, if it runs or memory is to be loaded, is restarted on
        them (``-incoming defer`` + the memory file for a checkpoint)."""
        targets = self._targets(snap, disks)
        overlays: dict[str, str] = {}
        for disk, file in targets:
            base = (await self.qemu_img.chain(disk.name, file, force_share=True)).base
            overlays[disk.name] = overlay_path(file, base.filename, snap.name)
        with_memory = snap.memory is MemoryKind.FILE
        if with_memory and (snap.memory_file is None or not os.path.exists(snap.memory_file)):
            raise DiskNotFoundError(f"memory file of {snap.name} is missing: {snap.memory_file}")
        if with_memory and self.monitor is None and not self._knows_launch():
            # Cold, and no way to start this VM: its disks are reverted, its memory stays in
            # the file for a later revert once qemusnap knows the command line.
            log.info("%s: QEMU's command line is unknown: reverting the disks only", snap.name)
            with_memory = False
        start = None
        if self.monitor is not None or with_memory:
            start = await self._prepare_restart(overlays)
        else:
            await self._refuse_in_use(disks, "use --qmp SOCKET to revert it live")
        old = {d.name: d.file for d in disks}
        target = requested or (snap.vm_state if with_memory else VMState.RUNNING)
        async with self._journal(
            "revert", name=snap.name, overlays=overlays, old=list(old.values()),
            target=str(target), memory=with_memory,
        ) as journal:  # fmt: skip
            for disk, file in targets:
                await self.qemu_img.create(
                    overlays[disk.name],
                    backing=file,
                    backing_fmt=await self._format(file),
                    owner=self._owner,
                )
            journal.passed("overlays-made")
            if start is not None:
                if self.monitor is not None:
                    await self._stop_qemu()
                journal.update(stopped=True)
                journal.passed("stopped")
                await start(with_memory)
                journal.update(started=True)
                journal.passed("started")
                if with_memory:
                    assert self.monitor is not None and snap.memory_file is not None
                    await self.memory.load(self.monitor, snap.memory_file, timeout=DEFAULT_TIMEOUT)
                await self._settle(target)
            self._adopt_disks(disks, overlays, owned=overlays.values())
        self._discard_abandoned(old.values())

    def _discard_abandoned(self, files: Iterable[str]) -> None:
        """Former active images nothing refers to any more (the state a revert left behind)
        are removed, if qemusnap made them."""
        needed = self._referenced_files()
        for path in files:
            if path not in needed and self.store.is_owned(self.record.id, path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                self.store.forget_file(self.record.id, path)

    async def _format(self, file: str) -> str:
        (info,) = await self.qemu_img.info(file, backing_chain=False, force_share=True)
        return info.format

    async def _settle(self, target: VMState) -> None:
        """Leave QEMU in ``target`` run state."""
        assert self.monitor is not None
        status = await self.monitor.query_status()
        if target is VMState.RUNNING and not status.running:
            await self.monitor.cont()
        elif target is VMState.PAUSED and status.running:
            await self.monitor.stop()

    def restore_point(
        self, name: str, *, timeout: float = DEFAULT_TIMEOUT
    ) -> contextlib.AbstractAsyncContextManager[Snapshot]:
        """``async with vm.restore_point("golden"):`` — the VM goes back to snapshot ``name``
        when the block ends, however it ends (taken on entry if it does not exist yet).  See
        :func:`qemusnap.harness.restore_point`."""
        from .harness import restore_point

        return restore_point(self, name, timeout=timeout)

    # --- restarting QEMU ------------------------------------------------------------------------

    def _knows_launch(self) -> bool:
        """Whether qemusnap can start this VM's QEMU (see :meth:`_prepare_restart`)."""
        launch = self.store.vm(self.record.id).launch
        return bool(
            self.relaunch_hook is not None
            or self.machine is not None
            or (launch and "argv" in launch)
        )

    async def _prepare_restart(self, new_files: dict[str, str]) -> Starter:
        """How to start this VM again with disks moved to ``new_files`` (disk name -> image).

        Everything that can be refused is refused here, *before* anything is stopped.

        A disk not in ``new_files`` restarts on the image it runs on now: the recorded command
        line (or the machine's config) names the image QEMU was started with, which a later
        external snapshot may have frozen under an overlay; starting on it would lose the
        overlay's data and write into a snapshot's image.
        """
        moved = dict(new_files)
        new_files = {d.name: d.file for d in await self.disks()} | moved
        if self.relaunch_hook is not None:
            hook = self.relaunch_hook

            async def by_hook(incoming: bool) -> None:
                self.monitor = await hook(dict(new_files), incoming)

            return by_hook
        if self.machine is not None:
            machine = self.machine
            config = attrs.evolve(
                machine.config,
                drives=tuple(
                    attrs.evolve(d, file=new_files.get(d.id, d.file)) for d in machine.config.drives
                ),
            )

            async def by_machine(incoming: bool) -> None:
                self.machine = Machine(config, paused=True, incoming=incoming)
                await self.machine.launch()
                self.monitor = self.machine.monitor

            return by_machine
        recorded = self.store.vm(self.record.id).launch
        if not recorded or "argv" not in recorded:
            raise UnsupportedError(
                "cannot start this VM's QEMU: its command line is unknown (attach once with"
                " --qmp SOCKET while it runs, or pass a relaunch hook)"
            )
        launch = RecordedLaunch.from_json(recorded)
        launch = launch.with_disks(await self._argv_replacements(launch, new_files, moved))
        log_file = self.store.memory_dir(self.record.id).parent / "qemu.log"

        async def by_command_line(incoming: bool) -> None:
            _, self.monitor = await relaunch(launch, incoming=incoming, log_file=log_file)
            self.store.set_vm_info(self.record.id, launch=launch.to_json())

        return by_command_line

    async def _argv_replacements(
        self, launch: RecordedLaunch, new_files: dict[str, str], moved: Iterable[str] = ()
    ) -> dict[str, str]:
        """Which path of the recorded command line each disk's new image replaces.

        The command line names an image of each disk's backing chain (the original base, if
        external snapshots came later): exactly one, or qemusnap cannot tell what to replace
        (an error for the disks in ``moved``; the others then keep their argument as is).
        """
        named = [p for p in image_paths_in_argv(launch.argv, launch.cwd) if os.path.exists(p)]
        replace: dict[str, str] = {}
        for disk in await self.disks():
            if disk.name not in new_files:
                continue
            chain = await self.qemu_img.chain(disk.name, disk.file, force_share=True)
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

    async def _stop_qemu(self) -> None:
        """``quit`` QEMU and wait until its process is gone (its images unlocked)."""
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

    # --- memory-only save / restore -------------------------------------------------------------

    async def save(
        self, file: str, *, progress: Progress | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """Save the VM's memory state into ``file`` and stop QEMU (``virsh save``)."""
        if self.monitor is None:
            raise UnsupportedError("save needs a running VM (--qmp SOCKET)")
        path = os.path.abspath(file)
        if os.path.lexists(path):
            raise TargetExistsError(f"{path} exists already (it is never overwritten)")
        async with deadline(timeout, f"save {path}"), self._operation(f"save {path}"):
            await self._prepare_restart({})  # restore must be possible: refuse now if not
            vm_state = await self.run_state()
            disks = await self.disks()
            saved = {
                "file": path,
                "vm_state": str(vm_state),
                "disks": {d.name: d.file for d in disks},
            }
            async with self._journal(
                "save", file=path, saved=saved, paused_by_us=vm_state is VMState.RUNNING, made=True
            ) as journal:
                if vm_state is VMState.RUNNING:
                    await self.monitor.stop()
                await self.memory.save(
                    self.monitor,
                    path,
                    live=False,
                    timeout=DEFAULT_TIMEOUT,
                    progress=progress,
                    owner=self._owner,
                )
                await self.monitor.wait_status_not("finish-migrate", timeout=30.0)
                journal.update(written=True, paused_by_us=False)
                journal.passed("written")
                await self._stop_qemu()
                journal.passed("stopped")
                with self.store.atomic():
                    self.store.set_saved(self.record.id, saved)
                    self.store.add_file(self.record.id, path, owned=False, role="save")

    async def restore(
        self,
        file: str,
        *,
        running: bool = False,
        paused: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        """Start QEMU again from a memory-only save (``virsh restore``)."""
        if self.monitor is not None:
            raise UnsupportedError("restore needs a stopped VM: this one runs")
        path = os.path.abspath(file)
        if not os.path.exists(path):
            raise DiskNotFoundError(f"no such saved state: {file}")
        async with deadline(timeout, f"restore {path}"), self._operation(f"restore {path}"):
            saved = self.store.vm(self.record.id).saved or {}
            if saved.get("file") not in (None, path):
                log.warning("%s is not this VM's last save (%s)", path, saved.get("file"))
            start = await self._prepare_restart({})
            default = VMState(saved.get("vm_state", "running"))
            target = VMState.RUNNING if running else VMState.PAUSED if paused else default
            async with self._journal("restore", file=path, target=str(target)) as journal:
                await start(True)
                journal.update(started=True)
                journal.passed("started")
                assert self.monitor is not None
                await self.memory.load(self.monitor, path, timeout=DEFAULT_TIMEOUT)
                await self._settle(target)

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
        """Delete snapshot ``name`` (and/or its descendants); returns the names removed.

        Without ``children`` the deleted snapshot's children move to its parent.  External
        snapshots are merged away so that no other snapshot and no running disk loses data;
        ``metadata_only`` forgets them and touches no file.
        """
        if children and children_only:
            raise UnsupportedError("--children and --children-only exclude each other")
        async with deadline(timeout, f"delete {name}"), self._operation(f"delete {name}"):
            tree = self.tree()
            plan = plan_delete(tree, name, children=children, children_only=children_only,
                               metadata_only=metadata_only)  # fmt: skip
            for victim in plan.remove:
                snap = tree.get(victim)
                if metadata_only:
                    self.store.remove_snapshots(self.record.id, [victim], {})
                elif snap.kind is SnapshotKind.INTERNAL:
                    files = [d.file for d in snap.disks if d.file]
                    await self._refuse_frozen_tags(snap)
                    # The reparenting is journaled too: a recovery that finishes the delete
                    # must not leave the children pointing at a snapshot that is gone.
                    async with self._journal(
                        "delete-internal", name=victim, files=files, reparent=plan.reparent
                    ) as journal:
                        await self._delete_internal_tags(victim, files)
                        journal.passed("tags-deleted")
                        self.store.remove_snapshots(self.record.id, [victim], {})
                else:
                    await self._merge_plans(snap)  # refuses what cannot be done, before any step
                    async with self._journal(
                        "delete-external", name=victim, reparent=plan.reparent
                    ) as journal:
                        await self._delete_external(snap, journal)
            self.store.remove_snapshots(self.record.id, [], plan.reparent)
        return list(plan.remove)

    async def _refuse_frozen_tags(self, snap: Snapshot) -> None:
        """Live, an internal snapshot inside an image QEMU reads as a backing file cannot be
        deleted (QEMU holds it read-only; qemu-img may not write it)."""
        if self.monitor is None:
            return
        active = {d.file for d in await self.disks()}
        nodes = await self._live_nodes()
        for d in snap.disks:
            if d.file and d.file not in active and d.file in nodes:
                raise UnsupportedError(
                    f"{snap.name} is stored inside {d.file}, which the running VM reads as a"
                    " backing file: delete it while the VM is stopped (--disk)"
                )

    async def _delete_internal_tags(self, name: str, files: Sequence[str]) -> None:
        """Remove tag ``name`` from the images that still hold it (idempotent, for recovery).

        Images QEMU writes go through the ``snapshot-delete`` job; the others through
        ``qemu-img snapshot -d``.
        """
        nodes = {d.file: d.node_name for d in await self.disks()} if self.monitor else {}
        holding = [
            f
            for f in files
            if os.path.exists(f) and any(s.name == name for s in await self._tags(f))
        ]
        in_qemu = [nodes[f] for f in holding if nodes.get(f)]
        if self.monitor is not None and in_qemu:
            await self.monitor.run_job(
                "snapshot-delete",
                {"tag": name, "devices": in_qemu},
                job_id=_job_id("delete"),
                timeout=DEFAULT_TIMEOUT,
            )
        for file in holding:
            if file not in nodes:
                await self.qemu_img.snapshot_delete(file, name)

    async def _delete_external(self, snap: Snapshot, journal: _Journal | None = None) -> None:
        """Merge each disk's frozen image away (see :mod:`qemusnap.plan`), remove the memory
        file, forget the snapshot.  Recovery runs it again after a crash.

        The steps and how many are done are journaled: a plan computed again after a commit
        step would differ (the committed image still names its old backing file, the image
        above it already names the new one) and could strand the committed image.
        """
        if journal is not None and "steps" in journal.data:
            steps = [_step_from_json(s) for s in journal.data["steps"]]
            done = int(journal.data.get("done", 0))
        else:
            steps = [step for plan in await self._merge_plans(snap) for step in plan]
            done = 0
            if journal is not None:
                journal.update(steps=[_step_to_json(s) for s in steps], done=0)
        for number, step in enumerate(steps[done:], start=done + 1):
            await self._run_step(step)
            if journal is not None:
                journal.update(done=number)
            crashpoint("delete-external", "step-done")
        if snap.memory_file and self.store.is_owned(self.record.id, snap.memory_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(snap.memory_file)
            self.store.forget_file(self.record.id, snap.memory_file)
        self.store.remove_snapshots(self.record.id, [snap.name], {})

    async def _merge_plans(self, snap: Snapshot) -> list[list[Step]]:
        """The merge steps for each disk of external snapshot ``snap`` (disks' chains are
        disjoint, so they can be planned together)."""
        graph, holds_internal = await self._image_graph()
        owned = {p for p, mine in self.store.files(self.record.id).items() if mine}
        # Images nothing needs any more (e.g. those a revert or an earlier delete left with no
        # snapshot and no disk reading through them) go first, so no merge wastes effort on
        # them or leaves them behind.
        dead = dead_images(ImageGraph(graph), self._referenced_files(), owned)
        alive = ImageGraph({k: v for k, v in graph.items() if k not in dead})
        merges = [
            plan_merge_away(alive, d.file, owned=owned, holds_internal=holds_internal)
            for d in snap.disks
            if d.snapshot is DiskSnapshotKind.EXTERNAL and d.file and d.file in graph
        ]
        return [[Remove(p) for p in dead], *merges]

    async def _image_graph(self) -> tuple[dict[str, str | None], set[str]]:
        """Backing file of every image this VM's snapshots and disks know, and which of them
        hold internal snapshots."""
        roles = self.store.owned_files(self.record.id)
        not_images = {p for p, role in roles.items() if role != "overlay"}
        not_images |= {s.memory_file for s in self.store.snapshots(self.record.id) if s.memory_file}
        saved = self.store.vm(self.record.id).saved
        if saved:
            not_images.add(saved["file"])
        known = set(self.store.files(self.record.id)) | self._referenced_files()
        known -= not_images
        for disk in await self.disks():
            chain = await self.qemu_img.chain(disk.name, disk.file, force_share=True)
            known.update(image.filename for image in chain.images)
        graph: dict[str, str | None] = {}
        holds_internal: set[str] = set()
        for path in sorted(known):
            if not os.path.exists(path):
                continue
            try:
                (info,) = await self.qemu_img.info(path, backing_chain=False, force_share=True)
            except OperationError:
                continue  # not an image (a memory file, a saved state)
            graph[path] = info.backing_filename
            if info.snapshots:
                holds_internal.add(path)
        return graph, holds_internal

    async def _run_step(self, step: Step) -> None:
        """One merge step, through QEMU when it has the image open, else with qemu-img."""
        nodes = await self._live_nodes() if self.monitor is not None else {}
        disks = await self.disks()
        match step:
            case Commit(top=top, base=base):
                if top in nodes and self.monitor is not None:
                    active = next((d for d in disks if d.file == top), None)
                    args: dict[str, Any] = {"base-node": nodes[base]}
                    if active is not None:  # active commit: READY, then pivot to base
                        args["device"] = nodes[top]
                    else:
                        args["device"] = await self._active_node_above(top, disks)
                        args["top-node"] = nodes[top]
                    job = _job_id("commit")
                    await self.monitor.run_block_job(
                        "block-commit", {"job-id": job, **args}, job_id=job, timeout=DEFAULT_TIMEOUT
                    )
                else:
                    await self._refuse_in_use([Disk(top, top, "qcow2")], "stop the VM first")
                    await self.qemu_img.commit(top, keep_top=True)
                self.store.rename_references(self.record.id, top, base)
            case Pull(image=image, new_backing=new):
                if image in nodes and self.monitor is not None:
                    job = _job_id("stream")
                    args = {"job-id": job, "device": nodes[image]}
                    if new is not None:
                        args["base-node"] = nodes[new]
                    await self.monitor.run_block_job(
                        "block-stream", args, job_id=job, timeout=DEFAULT_TIMEOUT
                    )
                else:
                    fmt = await self._format(new) if new else None
                    await self.qemu_img.rebase(image, new, fmt)
            case Rebind(image=image, new_backing=new):
                (info,) = await self.qemu_img.info(image, backing_chain=False, force_share=True)
                if info.backing_filename != new:
                    await self.qemu_img.rebase(image, new, await self._format(new), unsafe=True)
            case Remove(path=path):
                if self.monitor is not None and path in nodes:
                    # Merged out of every chain, but a node opened by -blockdev/blockdev-add
                    # stays open until it is deleted explicitly.
                    try:
                        await self.monitor.execute("blockdev-del", {"node-name": nodes[path]})
                    except CommandError as exc:
                        raise OperationError(f"QEMU still uses {path}: {exc}") from exc
                if self.store.is_owned(self.record.id, path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    self.store.forget_file(self.record.id, path)

    async def _active_node_above(self, image: str, disks: Sequence[Disk]) -> str:
        """The node name of the active image of the disk whose chain contains ``image``."""
        for disk in disks:
            chain = await self.qemu_img.chain(disk.name, disk.file, force_share=True)
            if image in {i.filename for i in chain.images} and disk.node_name:
                return disk.node_name
        raise OperationError(f"no running disk reads {image}")


# --- helpers ------------------------------------------------------------------------------------


def _step_to_json(step: Step) -> dict[str, Any]:
    return {"step": type(step).__name__, **attrs.asdict(step)}


def _step_from_json(data: dict[str, Any]) -> Step:
    kinds: dict[str, type[Step]] = {"Commit": Commit, "Pull": Pull, "Rebind": Rebind,
                                    "Remove": Remove}  # fmt: skip
    fields = {k: v for k, v in data.items() if k != "step"}
    return kinds[data["step"]](**fields)


def _snapshot_from_json(data: dict[str, Any]) -> Snapshot:
    """A :class:`Snapshot` from its ``to_json`` form (as journaled)."""
    return Snapshot.from_json(data)


async def _wait_until_free(state_dir: str | os.PathLike[str] | None, qmp_socket: str) -> None:
    """Wait (up to LOCK_TIMEOUT) while another qemusnap operation holds the VM last seen
    behind ``qmp_socket``; it also holds QEMU's only QMP connection."""
    directory = Path(state_dir) if state_dir is not None else default_state_dir()
    if not (directory / "qemusnap.db").exists():
        return  # nothing known yet (and nothing to create before the QEMU is accepted)
    with Store(directory) as store:
        known = store.find_vm_by_socket(qmp_socket)
        if known is None:
            return
        lock = VMLock(store.lock_path(known.id), "attach")
    deadline = time.monotonic() + LOCK_TIMEOUT
    while not lock.try_acquire():
        if time.monotonic() > deadline:
            raise lock.busy_error()
        await asyncio.sleep(0.1)
    lock.release()


async def _cold_record(store: Store, paths: Sequence[str]) -> VMRecord:
    """The VM a cold command means: the one owning any of ``paths``, or a new one made of them,
    or (no paths) the one the store knows (:meth:`Store.sole_vm`)."""
    if not paths:
        return store.sole_vm()
    absolute = [os.path.abspath(p) for p in paths]
    for path, given in zip(absolute, paths, strict=True):
        if not os.path.exists(path):
            raise DiskNotFoundError(f"no such disk image: {given}")
        if not (os.path.isfile(path) or Path(path).is_block_device()):
            raise DiskNotFoundError(f"not a disk image: {given} (a directory?)")
    found = store.find_vm(absolute)
    if found is not None:
        return found
    qemu_img = QemuImg()
    disks = []
    for path, given in zip(absolute, paths, strict=True):
        (info,) = await qemu_img.info(path, backing_chain=False, force_share=True)
        if info.format == "raw" and os.path.isfile(path) and os.path.getsize(path) % 512:
            # qemu-img reads any file as raw: a size no disk has means it is not one.
            raise DiskNotFoundError(f"not a disk image: {given} (not a multiple of 512 bytes)")
        disks.append(Disk(Path(path).stem, path, info.format))
    names = [d.name for d in disks]
    if len(set(names)) != len(names):
        raise UnsupportedError(f"two disks would share a name: {names}")
    return await _find_or_add_vm(store, disks)


async def _find_or_add_vm(store: Store, disks: Sequence[Disk]) -> VMRecord:
    """The store's record of the VM with these disks (made if new), active images updated."""
    qemu_img = QemuImg()
    writable = [d for d in disks if not d.read_only]
    files: list[str] = []
    for disk in writable:
        chain = await qemu_img.chain(disk.name, disk.file, force_share=True)
        files.extend(image.filename for image in chain.images)
    records = [DiskRecord(d.name, d.file, d.format) for d in writable]
    name = Path(writable[0].file).stem if writable else "vm"
    return store.find_or_add_vm(name, records, files)
