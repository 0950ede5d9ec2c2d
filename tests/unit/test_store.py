from __future__ import annotations

import multiprocessing
import os
import sqlite3
from pathlib import Path

import pytest
from helpers import make_snapshot

from qemusnap.errors import SnapshotExistsError, SnapshotNotFoundError
from qemusnap.models import (
    Consistency,
    MemoryKind,
    Snapshot,
    VMState,
)
from qemusnap.store import _ADDED_COLUMNS, DiskRecord, Store, VMLock


def snap(name: str, parent: str | None) -> Snapshot:
    return make_snapshot(
        name,
        parent,
        memory=MemoryKind.INTERNAL,
        consistency=Consistency.FULL,
        vm_state=VMState.RUNNING,
        description="d",
    )


def test_vm_lookup_by_any_known_file(tmp_path: Path) -> None:
    with Store(tmp_path / "state") as store:
        vm = store.add_vm("a", [DiskRecord("vda", "/a-top.qcow2", "qcow2")], ["/a-base.qcow2"])
        other = store.add_vm("b", [DiskRecord("vda", "/b.qcow2", "qcow2")], [])
        found_top = store.find_vm(["/a-top.qcow2"])
        found_base = store.find_vm(["/a-base.qcow2"])
        assert found_top is not None and found_top.id == vm.id
        assert found_base is not None and found_base.id == vm.id
        found_b = store.find_vm(["/b.qcow2"])
        assert found_b is not None and found_b.id == other.id
        assert store.find_vm(["/nowhere"]) is None
        assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


def test_snapshots_current_and_reparent(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        vm = store.add_vm("a", [DiskRecord("vda", "/a.qcow2", "qcow2")], [])
        store.add_snapshot(vm.id, snap("s1", None))
        store.add_snapshot(vm.id, snap("s2", "s1"))
        store.add_snapshot(vm.id, snap("s3", "s2"))
        with pytest.raises(SnapshotExistsError):
            store.add_snapshot(vm.id, snap("s2", None))
        assert [s.name for s in store.snapshots(vm.id)] == ["s1", "s2", "s3"]
        assert store.snapshot(vm.id, "s3").current
        store.remove_snapshots(vm.id, ["s2"], {"s3": "s1"})
        assert store.snapshot(vm.id, "s3").parent == "s1"
        store.remove_snapshots(vm.id, ["s3"], {})
        assert store.vm(vm.id).current == "s1"  # current moves to the parent
        with pytest.raises(SnapshotNotFoundError):
            store.snapshot(vm.id, "s3")
        # A second process sees the same data (WAL, committed transactions).
    with Store(tmp_path) as again:
        assert [s.name for s in again.snapshots(vm.id)] == ["s1"]


def test_journal_survives_until_ended(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        vm = store.add_vm("a", [], [])
        entry = store.journal_begin(vm.id, "create-internal", {"name": "s1"})
        store.journal_update(entry, paused_by_us=True)
    with Store(tmp_path) as store:
        (pending,) = store.journal(vm.id)
        assert pending.operation == "create-internal"
        assert pending.data == {"name": "s1", "paused_by_us": True}
        assert pending.pid == os.getpid()
        store.journal_end(pending.id)
        assert store.journal(vm.id) == []


def test_lock_is_exclusive_and_names_holder(tmp_path: Path) -> None:
    with Store(tmp_path) as store:
        path = store.lock_path(1)
    first = VMLock(path, "create s1")
    second = VMLock(path, "delete s1")
    assert first.try_acquire()
    try:
        assert not second.try_acquire()
        assert "create s1" in str(second.busy_error())
    finally:
        first.release()
    assert second.try_acquire()
    second.release()


def test_state_files_are_private(tmp_path: Path) -> None:
    with Store(tmp_path / "state") as store:
        vm = store.add_vm("a", [], [])
        memory = store.memory_dir(vm.id)
    assert (tmp_path / "state" / "qemusnap.db").stat().st_mode & 0o777 == 0o600
    for path in (memory, memory.parent, memory.parent.parent):
        assert path.stat().st_mode & 0o777 == 0o700, path


def _open_and_list(directory: str) -> int:
    with Store(directory) as store:
        return len(store.vms())


def test_an_old_state_directory_opened_by_many_processes_at_once(tmp_path: Path) -> None:
    """A state directory written before columns were added gains them once, whoever opens it
    first; the others wait for that transaction instead of adding them again."""
    with Store(tmp_path) as store:
        store.add_vm("a", [DiskRecord("vda", "/images/a.qcow2", "qcow2")], [])
    db = sqlite3.connect(tmp_path / "qemusnap.db")
    for table, column, _ in _ADDED_COLUMNS:
        db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    db.commit()
    db.close()
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        assert pool.map(_open_and_list, [str(tmp_path)] * 6) == [1] * 6
    with Store(tmp_path) as store:
        (vm,) = store.vms()
        assert vm.uid  # given during the migration
