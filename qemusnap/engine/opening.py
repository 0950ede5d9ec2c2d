"""Finding the store's record of the VM a caller opens (by its QEMU's disks, or by disk
images for a cold VM), and waiting while another qemusnap operation holds it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import cmdline
from ..errors import DiskNotFoundError, UnsupportedError
from ..models import Disk
from ..qemu_img import QemuImg
from ..store import DiskRecord, Store, VMLock, VMRecord, default_state_dir
from . import context


def refuse_throwaway_overlays(disks: Sequence[Disk], launch: Mapping[str, Any] | None) -> None:
    """Refuse a QEMU started with ``-snapshot`` (or ``-drive snapshot=on``), before the state
    directory records anything: QEMU writes the guest's data into temporary overlays it has
    already unlinked (``/var/tmp/vl.XXXXXX``, ``bdrv_append_temp_snapshot``) and throws away
    on exit, so no snapshot qemusnap took would survive a restart, and the images it would
    record are not the guest's."""
    argv = launch.get("argv", ()) if launch else ()
    temporary = [
        d
        for d in disks
        if os.path.basename(d.file).startswith("vl.") and not os.path.exists(d.file)
    ]
    if cmdline.throwaway_overlays(argv) or temporary:
        raise UnsupportedError(
            "QEMU runs with -snapshot (temporary overlays it discards on exit): nothing"
            " qemusnap saved would survive; start it without -snapshot"
        )


async def wait_until_free(state_dir: str | os.PathLike[str] | None, qmp_socket: str) -> None:
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
    deadline = time.monotonic() + context.LOCK_TIMEOUT
    while not lock.try_acquire():
        if time.monotonic() > deadline:
            raise lock.busy_error()
        await asyncio.sleep(0.1)
    lock.release()


async def cold_record(store: Store, paths: Sequence[str]) -> VMRecord:
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
    qemu_img = QemuImg(cache=store)
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
    return await find_or_add_vm(store, disks)


async def find_or_add_vm(store: Store, disks: Sequence[Disk]) -> VMRecord:
    """The store's record of the VM with these disks (made if new), active images updated."""
    qemu_img = QemuImg(cache=store)
    writable = [d for d in disks if not d.read_only]
    files: list[str] = []
    for disk in writable:
        chain = await qemu_img.chain(disk.name, disk.file, force_share=True)
        files.extend(image.filename for image in chain.images)
    records = [DiskRecord(d.name, d.file, d.format) for d in writable]
    name = Path(writable[0].file).stem if writable else "vm"
    return store.find_or_add_vm(name, records, files)


def forget_if_unused(store: Store, vm_id: int) -> bool:
    """Drop the record of VM ``vm_id`` (rows and lock file) if nothing came of it: no
    snapshot, no journal entry, no file qemusnap made, no saved state.  For a record this
    very command made when it opened the VM; True if it was dropped."""
    lock = VMLock(store.lock_path(vm_id), "forget")
    if not lock.try_acquire():
        return False  # another process works on it after all
    try:
        if (
            store.snapshots(vm_id)
            or store.journal(vm_id)
            or store.owned_files(vm_id)
            or store.vm(vm_id).saved
        ):
            return False
        store.remove_vm(vm_id)
        with contextlib.suppress(OSError):
            store.lock_path(vm_id).unlink()
        return True
    finally:
        lock.release()
