"""Clones: a new, independent VM started from an external checkpoint of another one.

A clone runs in a directory of its own::

    DIR/qmp.sock        its QMP socket (every socket, log and pid file of the source's command
                        line is moved here too, see qemusnap.clone_argv)
    DIR/<disk>.qcow2    one new overlay per disk, over the checkpoint's frozen image
    DIR/qemu.log        QEMU's own output
    DIR/state/          its qemusnap state directory (its own snapshot history)

It starts from the checkpoint's memory file, opened read-only and passed to ``migrate-incoming``
(``-incoming defer``): the file is never written, any number of clones can load it at once, and
the source VM, which runs on overlays above the same frozen images, is not touched.

The source keeps a record of each clone (``vms/ID/clones/NAME.json`` in its state directory):
the files the clone reads (the frozen images' whole backing chains and the memory file).  A
delete that would change or remove one of them is refused while the clone exists (its
overlays exist, or its QEMU runs), naming the clone.

The clone's steps are journaled in the clone's own state directory (journal ``clone``:
``name``, ``directory``, ``made_dir``, ``registry`` (the source's record of it), ``overlays``,
``files`` (sockets, logs), ``qmp_socket``; then ``pid``; crash points ``journaled``,
``overlays-made``, ``started``).  A clone interrupted half-way is rolled back by the next
command on that state directory (:func:`recover_clone`: its QEMU stopped, its overlays and the
source's record of it removed).  Clones do not take the source's lock: they only read the
source's state, so workers can clone one checkpoint at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs

from ..clone_argv import clone_argv
from ..errors import (
    DiskNotFoundError,
    OperationTimeout,
    TargetExistsError,
    UnsupportedError,
)
from ..machine import RecordedLaunch, pid_alive, relaunch, wait_pid_exit
from ..models import DiskSnapshotKind, MemoryFormat, MemoryKind, SnapshotKind, VMState
from ..monitor import Monitor
from ..store import DiskRecord, Store, VMRecord
from ..tree import SnapshotTree, validate_name
from .context import Context, log
from .journal import Journal, recovers
from .restart import argv_replacements

__all__ = ["Clone", "CloneRecord", "clone", "clones_using", "recover_clone", "source_launch"]


@attrs.frozen
class CloneRecord:
    """What the source VM's state directory knows of one of its clones."""

    name: str
    directory: str
    snapshot: str
    qmp_socket: str
    state_dir: str
    #: The clone's QEMU (None while it is being made).
    pid: int | None
    #: (disk name, the clone's own image) for each disk.
    disks: tuple[tuple[str, str], ...]
    #: The source's files the clone reads: every image under its overlays, the memory file.
    uses: tuple[str, ...]
    #: The process making the clone, while ``complete`` is false.
    creator: int
    complete: bool

    def to_json(self) -> dict[str, Any]:
        """SPEC section 3 ``clone --json``."""
        return {
            "name": self.name,
            "qmp_socket": self.qmp_socket,
            "state_dir": self.state_dir,
            "pid": self.pid,
            "disks": [{"name": n, "file": f} for n, f in self.disks],
        }

    def in_use(self) -> bool:
        """Whether the clone still needs the source's files: an overlay of it exists, its QEMU
        runs, or it is being made."""
        if any(os.path.exists(f) for _, f in self.disks):
            return True
        if self.pid is not None and pid_alive(self.pid):
            return True
        return not self.complete and pid_alive(self.creator)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CloneRecord:
        return cls(
            name=data["name"],
            directory=data["directory"],
            snapshot=data["snapshot"],
            qmp_socket=data["qmp_socket"],
            state_dir=data["state_dir"],
            pid=data.get("pid"),
            disks=tuple((d["name"], d["file"]) for d in data["disks"]),
            uses=tuple(data["uses"]),
            creator=data["creator"],
            complete=data["complete"],
        )

    def _to_file(self) -> dict[str, Any]:
        return {
            **self.to_json(),
            "directory": self.directory,
            "snapshot": self.snapshot,
            "uses": list(self.uses),
            "creator": self.creator,
            "complete": self.complete,
        }


def _registry(store: Store, vm_id: int) -> Path:
    path = store.memory_dir(vm_id).parent / "clones"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def clones(store: Store, vm_id: int) -> list[CloneRecord]:
    """Every clone the source VM's state directory records (in use or not)."""
    found = []
    # Read without creating anything (``_registry`` makes the directory for a writer).
    for path in sorted((store.directory / "vms" / str(vm_id) / "clones").glob("*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            found.append(CloneRecord.from_json(json.loads(path.read_text())))
    return found


def clones_using(store: Store, vm_id: int, files: Iterable[str]) -> list[CloneRecord]:
    """The clones in use that read one of ``files``."""
    wanted = set(files)
    return [c for c in clones(store, vm_id) if wanted.intersection(c.uses) and c.in_use()]


def _write_record(store: Store, vm_id: int, record: CloneRecord) -> Path:
    path = _registry(store, vm_id) / f"{record.name}.json"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record._to_file(), indent=1))
    os.replace(tmp, path)
    return path


@attrs.frozen
class Clone:
    """A clone just started: what the facade opens it with (its own store and record, the
    connected monitor, its QMP socket), and the source's record of it."""

    store: Store
    record: VMRecord
    monitor: Monitor
    qmp_socket: str
    registered: CloneRecord


def source_launch(ctx: Context) -> RecordedLaunch:
    """The command line the source VM runs from: recorded when it was attached by its QMP
    socket, or the one qemusnap launched it with."""
    recorded = ctx.store.vm(ctx.record.id).launch or {}
    if "argv" in recorded:
        return RecordedLaunch.from_json(recorded)
    if "machine_argv" in recorded:
        return RecordedLaunch(tuple(recorded["machine_argv"]), recorded["cwd"], "")
    if ctx.machine is not None:
        return RecordedLaunch(tuple(ctx.machine.config.argv()), os.getcwd(), "")
    raise UnsupportedError(
        "cannot clone this VM: its command line is unknown (attach once with --qmp SOCKET"
        " while it runs)"
    )


async def clone(
    source: Context,
    snapshot: str,
    directory: str,
    *,
    name: str | None = None,
    net: Mapping[str, str] | None = None,
    timeout: float,
) -> Clone:
    """Start a clone of ``source`` from checkpoint ``snapshot`` in ``directory`` (see
    :meth:`qemusnap.VM.clone`)."""
    directory = os.path.abspath(directory)
    name = name or os.path.basename(directory.rstrip("/"))
    validate_name(name)
    snap = SnapshotTree.of(source.store.snapshots(source.record.id)).get(snapshot)
    if snap.kind is not SnapshotKind.EXTERNAL or snap.memory is not MemoryKind.FILE:
        raise UnsupportedError(
            f"{snapshot} is not an external checkpoint: a clone starts from overlays over frozen"
            " images and a memory file (create it with --memory-file)"
        )
    if snap.memory_file is None or not os.path.exists(snap.memory_file):
        raise DiskNotFoundError(f"memory file of {snapshot} is missing: {snap.memory_file}")
    excluded = [d.name for d in snap.disks if d.snapshot is DiskSnapshotKind.EXCLUDED]
    if excluded:
        raise UnsupportedError(
            f"disk {excluded[0]} was excluded from {snapshot}: a clone cannot share the source's"
            " live image"
        )
    if os.path.lexists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
        raise TargetExistsError(f"{directory} exists and is not an empty directory")
    taken = [c for c in clones(source.store, source.record.id) if c.name == name]
    if taken and taken[0].in_use():
        raise TargetExistsError(f"a clone named {name} exists already ({taken[0].directory})")

    # Everything that can be refused is refused before the first file is made.
    launch = source_launch(source)
    overlays = {d.name: os.path.join(directory, f"{d.name}.qcow2") for d in snap.disks}
    replace = await argv_replacements(source, launch, overlays, moved=list(overlays))
    new = clone_argv(launch.argv, launch.cwd, directory=directory, disks=replace, netdevs=net)
    frozen = {d.name: d.file for d in snap.disks if d.file}
    uses = {snap.memory_file}
    formats = {}
    for disk, file in frozen.items():
        chain = await source.qemu_img.chain(disk, file, force_share=True)
        uses.update(image.filename for image in chain.images)
        formats[disk] = chain.images[0].format

    record = CloneRecord(
        name=name,
        directory=directory,
        snapshot=snapshot,
        qmp_socket=new.qmp_socket,
        state_dir=os.path.join(directory, "state"),
        pid=None,
        disks=tuple(overlays.items()),
        uses=tuple(sorted(uses)),
        creator=os.getpid(),
        complete=False,
    )
    made_dir = not os.path.exists(directory)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    # Recorded in the source first: from now on a delete of what the clone reads is refused.
    registry = _write_record(source.store, source.record.id, record)
    data: dict[str, Any] = {
        "name": name,
        "directory": directory,
        "made_dir": made_dir,
        "registry": str(registry),
        "overlays": list(overlays.values()),
        "files": list(new.files),
        "qmp_socket": new.qmp_socket,
    }
    store: Store | None = None
    journal: Journal | None = None
    monitor: Monitor | None = None
    try:
        store = Store(record.state_dir)
        vm_record = store.add_vm(
            name, [DiskRecord(d, f, "qcow2") for d, f in overlays.items()], base_files=sorted(uses)
        )
        journal = Journal(store, vm_record.id, "clone", data)  # crash point "journaled"
        for disk, file in frozen.items():
            await source.qemu_img.create(
                overlays[disk], backing=file, backing_fmt=formats[disk], owner=source.owner
            )
            store.add_file(vm_record.id, overlays[disk], owned=True, role="overlay")
        journal.passed("overlays-made")
        started = RecordedLaunch(
            new.argv, launch.cwd, new.qmp_socket, launch.uid, launch.gid, launch.groups
        )
        if snap.machine_type is not None:
            # The memory state loads only into the machine type it was taken on.
            started = started.with_machine(snap.machine_type)
        process, monitor = await relaunch(
            started, incoming=True, log_file=Path(directory) / "qemu.log", timeout=timeout
        )
        journal.update(pid=process.pid)
        journal.passed("started")
        await source.memory.load(
            monitor,
            snap.memory_file,
            timeout=timeout,
            fmt=snap.memory_format or MemoryFormat.STREAM,
        )
        await monitor.wait_status_not("inmigrate", timeout=30.0)
        if snap.vm_state is VMState.RUNNING:
            await monitor.cont()
        disks = [d for d in await monitor.disks() if not d.read_only]
        store.set_disks(vm_record.id, [DiskRecord(d.name, d.file, d.format) for d in disks])
        # What a revert or a further clone of the clone restarts it from: its own process.
        recorded = RecordedLaunch.of_pid(process.pid, new.qmp_socket)
        store.set_vm_info(vm_record.id, qmp_socket=new.qmp_socket, launch=recorded.to_json())
        record = attrs.evolve(record, pid=process.pid, complete=True)
        _write_record(source.store, source.record.id, record)
        store.journal_end(journal.id)
    except BaseException:
        try:
            if monitor is not None:
                with contextlib.suppress(Exception):
                    await monitor.close()
            await recover_clone(data)  # the journal's data: what was made so far
            if store is not None and journal is not None:
                store.journal_end(journal.id)
        finally:
            if store is not None:
                store.close()
        # Only what this clone made is in there (the directory was absent or empty).
        shutil.rmtree(directory if made_dir else record.state_dir, ignore_errors=True)
        raise
    return Clone(store, store.vm(vm_record.id), monitor, new.qmp_socket, record)


@recovers("clone")
async def _recover(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    await recover_clone(data)


async def recover_clone(data: Mapping[str, Any]) -> None:
    """Roll back a clone made part-way (an error, or an interrupted process): its QEMU is
    stopped, the files it made and the source's record of it are removed."""
    pid = data.get("pid")
    if pid is not None and _is_clone_qemu(pid, data["qmp_socket"]):
        os.kill(pid, signal.SIGTERM)
        if not await wait_pid_exit(pid, 10.0):
            os.kill(pid, signal.SIGKILL)
            if not await wait_pid_exit(pid, 10.0):
                raise OperationTimeout(f"the clone's QEMU (pid {pid}) did not exit")
    for path in [*data.get("overlays", []), *data.get("files", []), data.get("registry")]:
        if path and os.path.lexists(path):
            os.unlink(path)
    log.info("clone %s rolled back", data.get("name"))


def _is_clone_qemu(pid: int, qmp_socket: str) -> bool:
    """Whether ``pid`` still is the clone's QEMU (not a recycled pid): its command line names
    the clone's QMP socket."""
    try:
        return qmp_socket.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def refuse_if_cloned(store: Store, vm_id: int, snapshot: str, files: Iterable[str]) -> None:
    """Refuse to delete ``snapshot`` when that would change or remove a file a clone reads."""
    users = clones_using(store, vm_id, files)
    if users:
        names = ", ".join(f"{c.name} ({c.directory})" for c in users)
        raise UnsupportedError(
            f"{snapshot} is in use by clone{'s' if len(users) > 1 else ''} {names}: stop"
            " them and remove their directories first"
        )


def stop_clone_process(pid: int, qmp_socket: str, timeout: float = 10.0) -> None:
    """Kill a clone's QEMU (used by harnesses at the end; ``quit`` over QMP is nicer when a
    monitor is at hand)."""
    if not _is_clone_qemu(pid, qmp_socket):
        return
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
