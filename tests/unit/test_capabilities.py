"""The one place that decides mechanisms per QEMU, fed with the real answers of Debian's QEMU
7.2, 10.0 and 11.1 (``query-version``, ``query-migrate-capabilities`` and the parts of
``query-qmp-schema`` the decisions read: every command, the types under ``migrate`` and
``migrate-set-parameters``, and the argument types that carry a ``deprecated`` member), recorded
in tests/unit/schemas/ from each version's ``qemu-system-x86_64 -machine none -qmp stdio``.
"""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path
from typing import Any

import attrs
import pytest
from helpers import make_snapshot

from qemusnap.capabilities import (
    Capabilities,
    MemoryFormat,
    Transport,
    machine_option,
    pin_machine,
)
from qemusnap.errors import UnsupportedError
from qemusnap.machine import MachineConfig, RecordedLaunch, pin_machine_in_argv
from qemusnap.models import (
    Consistency,
    DiskSnapshot,
    DiskSnapshotKind,
    MemoryKind,
    Snapshot,
    SnapshotKind,
    VMState,
)
from qemusnap.store import DiskRecord, Store

SCHEMAS = Path(__file__).parent / "schemas"
PACKAGE = Path(__file__).resolve().parents[2] / "qemusnap"
VERSIONS = ["7.2", "10.0", "11.1"]


def probe(version: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCHEMAS / f"qemu-{version}.json").read_text())
    return data


def caps(version: str, *, drop_capabilities: frozenset[str] = frozenset()) -> Capabilities:
    data = probe(version)
    return Capabilities.from_probe(
        data["query-version"],
        data["query-qmp-schema"],
        [c for c in data["query-migrate-capabilities"] if c["capability"] not in drop_capabilities],
    )


def test_qemu_72_has_only_fd_streams() -> None:
    c = caps("7.2")
    assert c.version == (7, 2, 22)
    assert not c.file_uri and not c.mapped_ram and c.background_snapshot
    for live in (False, True):
        m = c.save_mechanism(live=live)
        assert (m.transport, m.format, m.multifd_channels) == (Transport.FD, MemoryFormat.STREAM, 0)
        assert dict(m.capabilities) == {"background-snapshot": live, "multifd": False}
    assert c.load_mechanism(MemoryFormat.STREAM).transport is Transport.FD
    with pytest.raises(UnsupportedError, match="mapped-ram"):
        c.load_mechanism(MemoryFormat.MAPPED_RAM)


@pytest.mark.parametrize("version", ["10.0", "11.1"])
def test_newer_qemu_writes_files_through_file_uri(version: str) -> None:
    c = caps(version)
    assert c.version[:2] == tuple(map(int, version.split(".")))
    assert c.file_uri and c.mapped_ram
    assert {"socket", "exec", "file"} <= c.migration_transports
    saved = c.save_mechanism(live=False, channels=3)
    assert (saved.transport, saved.format, saved.multifd_channels) == (
        Transport.FILE,
        MemoryFormat.MAPPED_RAM,
        3,
    )
    assert dict(saved.capabilities) == {
        "background-snapshot": False,
        "mapped-ram": True,
        "multifd": True,
    }
    # background-snapshot is refused together with multifd/mapped-ram: a live one is a stream,
    # and every capability a mapped-ram save set before is cleared again.
    live = c.save_mechanism(live=True)
    assert (live.transport, live.format, live.multifd_channels) == (
        Transport.FILE,
        MemoryFormat.STREAM,
        0,
    )
    assert dict(live.capabilities) == {
        "background-snapshot": True,
        "mapped-ram": False,
        "multifd": False,
    }
    assert c.save_mechanism(live=False, mapped_ram=False).format is MemoryFormat.STREAM
    # A stream written by 7.2 through fd: is read through file: (11.1 refuses fd: files).
    old = c.load_mechanism(MemoryFormat.STREAM)
    assert (old.transport, old.format, dict(old.capabilities)["mapped-ram"]) == (
        Transport.FILE,
        MemoryFormat.STREAM,
        False,
    )
    assert c.load_mechanism(MemoryFormat.MAPPED_RAM).multifd_channels > 0
    # "uri" is not deprecated up to 11.1: no switch to "channels" yet.
    assert "channels" in c.migrate_args and not c.use_channels


def test_between_versions_by_capability_not_version() -> None:
    """A QEMU with file: but without mapped-ram (8.2, Ubuntu 24.04) writes file: streams."""
    c = caps("10.0", drop_capabilities=frozenset({"mapped-ram"}))
    assert c.file_uri and not c.mapped_ram
    m = c.save_mechanism(live=False)
    assert (m.transport, m.format) == (Transport.FILE, MemoryFormat.STREAM)
    assert "mapped-ram" not in dict(m.capabilities)


def test_channels_replace_a_deprecated_uri() -> None:
    c = attrs.evolve(caps("11.1"), deprecated=caps("11.1").deprecated | {"migrate.uri"})
    assert c.use_channels and c.save_mechanism(live=True).use_channels


def test_no_live_checkpoint_without_background_snapshot() -> None:
    c = caps("10.0", drop_capabilities=frozenset({"background-snapshot"}))
    with pytest.raises(UnsupportedError, match="background-snapshot"):
        c.save_mechanism(live=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_qemusnap_sends_no_missing_or_deprecated_command(version: str) -> None:
    """Every QMP command in qemusnap's source exists in that QEMU and is not deprecated
    (11.1 deprecates block-job-complete and block-job-dismiss: job-complete/-dismiss)."""
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    found = re.findall(r'(?:execute|run_job|run_block_job)\(\s*"([a-z][a-z0-9-]+)"', source)
    sent = {name for name in found if not name.startswith("guest-")}  # the agent's, not QMP
    c = caps(version)
    assert {"migrate", "transaction", "add-fd", "job-complete"} <= sent
    assert sent - c.commands == set()
    assert sent & c.deprecated == set()


def test_machine_type_pinning() -> None:
    assert machine_option("pc-q35-7.2-machine") == "pc-q35-7.2"
    assert pin_machine("q35", "pc-q35-7.2") == "pc-q35-7.2"
    assert pin_machine("pc,accel=kvm", "pc-i440fx-7.2") == "pc-i440fx-7.2,accel=kvm"
    assert pin_machine("type=q35,smm=off", "pc-q35-7.2") == "pc-q35-7.2,smm=off"
    assert pin_machine(None, "pc-i440fx-7.2") == "pc-i440fx-7.2"
    assert pin_machine("pc-q35-8.2", "pc-q35-7.2") is None  # explicit versioned type: kept
    assert pin_machine("microvm", "pc-q35-7.2") is None
    argv = ["qemu", "-m", "256", "-machine", "q35,accel=tcg", "-M", "accel=tcg"]
    assert pin_machine_in_argv(argv, "pc-q35-7.2") == [
        "qemu", "-m", "256", "-machine", "pc-q35-7.2,accel=tcg", "-M", "accel=tcg",
    ]  # fmt: skip
    assert pin_machine_in_argv(["qemu", "-machine", "accel=tcg"], "pc-i440fx-7.2") == [
        "qemu", "-machine", "pc-i440fx-7.2", "-machine", "accel=tcg",
    ]  # fmt: skip
    assert pin_machine_in_argv(["qemu", "-M", "pc-q35-9.2"], "pc-q35-7.2") == [
        "qemu", "-M", "pc-q35-9.2",
    ]  # fmt: skip
    launch = RecordedLaunch(("qemu", "-m", "1G"), "/", "/q.sock")
    assert launch.with_machine("pc-i440fx-7.2").argv == ("qemu", "-machine", "pc-i440fx-7.2",
                                                         "-m", "1G")  # fmt: skip
    config = MachineConfig(hugepages=True, memory_mib=256).with_machine("pc-q35-7.2")
    assert config.argv()[config.argv().index("-machine") + 1] == "pc-q35-7.2,memory-backend=qs-ram"


def checkpoint(name: str, **kwargs: Any) -> Snapshot:
    return make_snapshot(
        name,
        kind=SnapshotKind.EXTERNAL,
        memory=MemoryKind.FILE,
        consistency=Consistency.FULL,
        vm_state=VMState.RUNNING,
        disks=(DiskSnapshot("vda", DiskSnapshotKind.EXTERNAL, "/a.qcow2"),),
        memory_file=f"/{name}.mem",
        **kwargs,
    )


def test_state_directory_of_an_older_qemusnap_reads_as_fd_streams(tmp_path: Path) -> None:
    """A version-1 database (no memory_format/machine_type columns) gets them added; its
    checkpoints read back as streams with no machine type, new ones keep theirs."""
    with Store(tmp_path) as store:
        vm = store.add_vm("a", [DiskRecord("vda", "/a.qcow2", "qcow2")], [])
        store.add_snapshot(vm.id, checkpoint("old"))
    db = sqlite3.connect(tmp_path / "qemusnap.db")
    db.execute("ALTER TABLE snapshots DROP COLUMN memory_format")
    db.execute("ALTER TABLE snapshots DROP COLUMN machine_type")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with Store(tmp_path) as store:
        old = store.snapshot(vm.id, "old")
        assert old.memory_format is MemoryFormat.STREAM and old.machine_type is None
        store.add_snapshot(
            vm.id,
            checkpoint("new", memory_format=MemoryFormat.MAPPED_RAM, machine_type="pc-q35-7.2"),
        )
    with Store(tmp_path) as store:
        new = store.snapshot(vm.id, "new")
        assert new.memory_format is MemoryFormat.MAPPED_RAM and new.machine_type == "pc-q35-7.2"
        assert new.to_json()["memory_format"] == "mapped-ram"
        assert Snapshot.from_json(new.to_json()) == new


def test_migrate_arguments_and_the_armed_signal() -> None:
    from qemusnap.memory import _migrate_args, _ram_flowing

    stream = caps("11.1").save_mechanism(live=True)
    assert _migrate_args(stream, "file:/dev/fdset/3") == {"uri": "file:/dev/fdset/3"}
    channels = attrs.evolve(stream, use_channels=True)
    assert _migrate_args(channels, "file:/dev/fdset/3") == {
        "channels": [
            {
                "channel-type": "main",
                "addr": {"transport": "file", "filename": "/dev/fdset/3", "offset": 0},
            }
        ]
    }
    # Pages counted (sent, or zero pages skipped): the write tracking is armed.
    assert not _ram_flowing({"status": "active", "ram": {"normal": 0, "duplicate": 0}})
    assert not _ram_flowing({"status": "active"})
    assert _ram_flowing({"status": "active", "ram": {"normal": 0, "duplicate": 12}})
    assert _ram_flowing({"status": "active", "ram": {"normal": 3, "duplicate": 0}})
