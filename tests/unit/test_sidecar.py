"""Sidecar files mirror the store (qemusnap.sidecar, Store.sync_sidecars): written beside the
data, 0600, atomically, updated when the snapshot changes, removed with it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import attrs
import pytest
from helpers import make_snapshot

from qemusnap import sidecar
from qemusnap.models import (
    DiskSnapshot,
    DiskSnapshotKind,
    Snapshot,
)
from qemusnap.plan import ImageGraph, plan_merge_away
from qemusnap.store import DiskRecord, Store


def snap(name: str, parent: str | None, image: Path) -> Snapshot:
    return make_snapshot(name, parent, image=image, description="a / any name")


def sidecars(directory: Path) -> dict[str, dict[str, object]]:
    folder = directory / sidecar.DIRNAME
    return {
        json.loads(p.read_text())["snapshot"]["name"]: json.loads(p.read_text())
        for p in folder.glob("*.json")
    }


def test_sidecars_follow_the_store(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    disk = images / "a.qcow2"
    disk.write_bytes(b"")
    with Store(tmp_path / "state") as store:
        vm = store.add_vm("a", [DiskRecord("vda", str(disk), "qcow2")], [str(disk)])
        store.add_snapshot(vm.id, snap("s1", None, disk))
        store.add_snapshot(vm.id, snap("s2", "s1", disk))
        found = sidecars(images)
        assert set(found) == {"s1", "s2"}
        assert found["s2"]["snapshot"]["current"] is True  # type: ignore[index]
        assert found["s1"]["snapshot"]["current"] is False  # type: ignore[index]
        assert found["s1"]["vm"]["uid"] == store.vm(vm.id).uid  # type: ignore[index]
        folder = images / sidecar.DIRNAME
        assert folder.stat().st_mode & 0o777 == 0o700
        assert all(p.stat().st_mode & 0o777 == 0o600 for p in folder.iterdir())
        assert not [p for p in folder.iterdir() if p.name.startswith(".tmp")]

        # Current moves: both sidecars say so.
        store.set_current(vm.id, "s1")
        found = sidecars(images)
        assert found["s1"]["snapshot"]["current"] is True  # type: ignore[index]
        assert found["s2"]["snapshot"]["current"] is False  # type: ignore[index]

        # The recorded command line lands in the current snapshot's sidecar (the one written
        # last, whose VM record rebuild takes); the others are not rewritten for it.
        s2_inode = (
            next(p for p in (images / sidecar.DIRNAME).iterdir() if "s2" in p.read_text())
            .stat()
            .st_ino
        )
        store.set_vm_info(vm.id, launch={"argv": ["qemu-system-x86_64", "-m", "64"]})
        found = sidecars(images)
        assert found["s1"]["vm"]["launch"]["argv"][0] == "qemu-system-x86_64"  # type: ignore[index]
        assert found["s2"]["vm"]["launch"] is None  # type: ignore[index]
        assert found["s1"]["written"] > found["s2"]["written"]  # type: ignore[operator]
        assert s2_inode in {p.stat().st_ino for p in (images / sidecar.DIRNAME).iterdir()}

        # Data moving to another image (a commit) moves the sidecar; deletion removes it.
        other = tmp_path / "other"
        other.mkdir()
        (other / "b.qcow2").write_bytes(b"")
        store.rename_references(vm.id, str(disk), str(other / "b.qcow2"))
        assert set(sidecars(other)) == {"s1", "s2"} and not (images / sidecar.DIRNAME).exists()
        store.remove_snapshots(vm.id, ["s2"], {})
        assert set(sidecars(other)) == {"s1"}


def test_unchanged_sidecars_are_not_rewritten(tmp_path: Path) -> None:
    disk = tmp_path / "a.qcow2"
    disk.write_bytes(b"")
    with Store(tmp_path / "state") as store:
        vm = store.add_vm("a", [DiskRecord("vda", str(disk), "qcow2")], [])
        store.add_snapshot(vm.id, snap("s1", None, disk))
        (path,) = (tmp_path / sidecar.DIRNAME).iterdir()
        inode = path.stat().st_ino
        store.set_current(vm.id, "s1")  # already current: same content
        assert path.stat().st_ino == inode


def test_each_change_brings_in_line_exactly_the_sidecars_it_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After every store change only the touched snapshots' sidecars are looked at (a thousand
    snapshots must not cost a thousand reads per operation), and a full sync afterwards finds
    nothing left to write or remove."""
    images = tmp_path / "images"
    images.mkdir()
    disk, moved = images / "a.qcow2", images / "b.qcow2"
    disk.write_bytes(b"")
    moved.write_bytes(b"")
    looked_at: list[str] = []
    read = sidecar.read

    def counting_read(path: str) -> dict[str, object] | None:
        looked_at.append(path)
        return read(path)

    monkeypatch.setattr(sidecar, "read", counting_read)
    with Store(tmp_path / "state") as store:
        vm = store.add_vm("a", [DiskRecord("vda", str(disk), "qcow2")], [str(disk)])
        for number in range(40):
            store.add_snapshot(
                vm.id, snap(f"s{number}", f"s{number - 1}" if number else None, disk)
            )
        changes = [
            lambda: store.add_snapshot(vm.id, snap("new", "s39", disk)),
            lambda: store.set_current(vm.id, "s10"),
            lambda: store.remove_snapshots(vm.id, ["s20"], {"s21": "s19"}),
            lambda: store.remove_snapshots(vm.id, ["s10"], {"s11": "s9"}),  # the current one
            lambda: store.update_snapshot_disks(
                vm.id, "s5", [DiskSnapshot("vda", DiskSnapshotKind.INTERNAL, str(moved))]
            ),
            lambda: store.add_file(vm.id, str(moved), owned=True, role="overlay"),
            lambda: store.set_vm_info(vm.id, launch={"argv": ["qemu-system-x86_64"]}),
            lambda: store.set_disks(vm.id, [DiskRecord("vda", str(moved), "qcow2")]),
            lambda: store.rename_references(vm.id, str(moved), str(disk)),
            lambda: store.set_current(vm.id, None),
        ]
        for change in changes:
            looked_at.clear()
            change()
            assert len(looked_at) <= 4, looked_at
            before = {p.name: p.read_bytes() for p in (images / sidecar.DIRNAME).iterdir()}
            assert store.sync_sidecars(vm.id) == []
            after = {p.name: p.read_bytes() for p in (images / sidecar.DIRNAME).iterdir()}
            assert after == before
        assert set(sidecars(images)) == {s.name for s in store.snapshots(vm.id)}


def test_a_sidecar_that_cannot_be_written_does_not_fail_the_store(tmp_path: Path) -> None:
    disk = tmp_path / "ro" / "a.qcow2"
    disk.parent.mkdir()
    disk.write_bytes(b"")
    (disk.parent / sidecar.DIRNAME).write_text("not a directory")
    with Store(tmp_path / "state") as store:
        vm = store.add_vm("a", [DiskRecord("vda", str(disk), "qcow2")], [])
        store.add_snapshot(vm.id, snap("s1", None, disk))
        assert store.snapshot(vm.id, "s1").name == "s1"
        problems = store.sync_sidecars(vm.id)
        assert len(problems) == 1 and "s1" in problems[0]


def test_write_is_atomic_and_private(tmp_path: Path) -> None:
    path = sidecar.path_for(str(tmp_path / "x.qcow2"), "uid", "n")
    assert sidecar.write(path, {"snapshot": {"name": "n"}, "written": 1})
    assert not sidecar.write(path, {"snapshot": {"name": "n"}, "written": 2})  # same content
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert sidecar.read(path) == {
        "format": sidecar.FORMAT,
        "version": sidecar.VERSION,
        "snapshot": {"name": "n"},
        "written": 1,
    }
    assert next(p for _, p in sidecar.scan([str(tmp_path)]))["snapshot"] == {"name": "n"}
    sidecar.remove(path)
    assert not os.path.exists(os.path.dirname(path))  # the emptied folder goes too


def test_backing_files_the_vm_came_with_are_protected(tmp_path: Path) -> None:
    with Store(tmp_path / "state") as store:
        vm = store.add_vm("a", [DiskRecord("vda", "/vm.qcow2", "qcow2")],
                          ["/vm.qcow2", "/template.qcow2"])  # fmt: skip
        assert store.protected_files(vm.id) == {"/template.qcow2"}
    graph = ImageGraph({"/top": "/template.qcow2", "/template.qcow2": None})
    # Without the protection a single owned dependent is committed down into the frozen image.
    assert plan_merge_away(graph, "/template.qcow2", owned={"/top"}, holds_internal=())
    assert (
        plan_merge_away(
            graph,
            "/template.qcow2",
            owned={"/top"},
            holds_internal=(),
            protected={"/template.qcow2"},
        )
        == []
    )


def test_store_rows_carry_adopted_and_partial(tmp_path: Path) -> None:
    disk = tmp_path / "a.qcow2"
    disk.write_bytes(b"")
    with Store(tmp_path / "state") as store:
        vm = store.add_vm("a", [DiskRecord("vda", str(disk), "qcow2")], [])
        store.add_snapshot(vm.id, attrs.evolve(snap("t", None, disk), adopted=True, partial=True))
        got = store.snapshot(vm.id, "t")
        assert got.adopted and got.partial
        assert got.to_json()["adopted"] is True and got.to_json()["partial"] is True
