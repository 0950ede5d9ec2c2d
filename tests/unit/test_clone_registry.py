"""The source's record of its clones: which count as using its files, and the delete refusal
that names them (qemusnap.engine.clone, no QEMU needed)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qemusnap.engine.clone import CloneRecord, _write_record, clones, clones_using, refuse_if_cloned
from qemusnap.errors import UnsupportedError
from qemusnap.store import Store

DEAD_PID = 2**22 + 1  # above the kernel's pid_max default: never a live process


def _record(tmp: Path, name: str, **changes: object) -> CloneRecord:
    fields: dict[str, object] = {
        "name": name,
        "directory": str(tmp / name),
        "snapshot": "golden",
        "qmp_socket": str(tmp / name / "qmp.sock"),
        "state_dir": str(tmp / name / "state"),
        "pid": None,
        "disks": (("vda", str(tmp / name / "vda.qcow2")),),
        "uses": ("/img/base.qcow2", "/img/golden.mem"),
        "creator": DEAD_PID,
        "complete": True,
    }
    fields.update(changes)
    return CloneRecord(**fields)  # type: ignore[arg-type]


def test_a_clone_uses_the_source_while_its_overlay_exists(tmp_path: Path) -> None:
    with Store(tmp_path / "state") as store:
        vm = store.add_vm("src", [], [])
        _write_record(store, vm.id, _record(tmp_path, "c1"))
        assert [c.name for c in clones(store, vm.id)] == ["c1"]
        assert clones_using(store, vm.id, ["/img/base.qcow2"]) == []  # no overlay, no QEMU
        (tmp_path / "c1").mkdir()
        (tmp_path / "c1" / "vda.qcow2").write_bytes(b"")
        assert [c.name for c in clones_using(store, vm.id, ["/img/base.qcow2"])] == ["c1"]
        assert clones_using(store, vm.id, ["/img/other.qcow2"]) == []
        with pytest.raises(UnsupportedError) as info:
            refuse_if_cloned(store, vm.id, "golden", ["/img/golden.mem"])
        assert str(info.value) == (
            f"golden is in use by clone c1 ({tmp_path / 'c1'}): stop them and remove their"
            " directories first"
        )
        refuse_if_cloned(store, vm.id, "other", ["/img/unrelated.qcow2"])  # no error


def test_running_or_half_made_clones_count_too(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with Store(tmp_path / "state") as store:
            vm = store.add_vm("src", [], [])
            _write_record(store, vm.id, _record(tmp_path, "running", pid=sleeper.pid))
            _write_record(
                store, vm.id, _record(tmp_path, "making", complete=False, creator=os.getpid())
            )
            _write_record(store, vm.id, _record(tmp_path, "abandoned", complete=False))
            users = clones_using(store, vm.id, ["/img/golden.mem"])
            assert sorted(c.name for c in users) == ["making", "running"]
            with pytest.raises(UnsupportedError, match=r"in use by clones making .*, running "):
                refuse_if_cloned(store, vm.id, "golden", ["/img/base.qcow2"])
    finally:
        sleeper.kill()
        sleeper.wait()


def test_clone_json_is_the_spec_document(tmp_path: Path) -> None:
    record = _record(tmp_path, "c1", pid=42)
    assert record.to_json() == {
        "name": "c1",
        "qmp_socket": str(tmp_path / "c1" / "qmp.sock"),
        "state_dir": str(tmp_path / "c1" / "state"),
        "pid": 42,
        "disks": [{"name": "vda", "file": str(tmp_path / "c1" / "vda.qcow2")}],
    }
    assert CloneRecord.from_json(record._to_file()) == record
