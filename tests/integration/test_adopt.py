"""Snapshots already in the images are adopted (issue 14, items 1 and 4).

* tags made by ``qemu-img snapshot -c`` on a stopped VM's disks appear on first contact
  (``--disk``), marked adopted; a tag on one disk only is partial: revert refused, delete works;
* a VM state saved with HMP ``savevm`` on a live VM appears on first contact (attach) as an
  adopted internal checkpoint, and ``revert`` brings the disks back in the same QEMU;
* ``qemusnap adopt`` adds tags made after first contact, placed in the tree by date;
* a template + overlay chain made by hand: the template is never merged into, rebased or
  removed, and ``chain --json`` says which files qemusnap owns.

Byte patterns written, snapshot, overwritten, reverted, read back; ``qemu-img check`` clean.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from livevm import (
    check_clean,
    firmware_config,
    flush_live,
    make_disks,
    read_cold,
    read_live,
    write_cold,
    write_live,
)

from qemusnap import VM, MemoryKind, SnapshotKind
from qemusnap.machine import Machine

P1, P2, P3, P4 = 0x11, 0x22, 0x33, 0x44

pytestmark = [pytest.mark.qemu_img]


def qs(state: Path, *args: str | Path, expect: int = 0) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "qemusnap", "--state", str(state), *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == expect, f"{argv}: {done.returncode}\n{done.stdout}{done.stderr}"
    return done


def qs_json(state: Path, *args: str | Path) -> Any:
    return json.loads(qs(state, "--json", *args).stdout)


def tags(image: Path) -> list[str]:
    done = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(image)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [s["name"] for s in json.loads(done.stdout).get("snapshots", [])]


def test_qemu_img_tags_adopted_reverted_deleted(short_tmp: Path) -> None:
    a, b = make_disks(short_tmp, ("a", "b"))
    state = short_tmp / "state"
    for image in (a, b):
        write_cold(image, P1)
        subprocess.run(["qemu-img", "snapshot", "-c", "pre-existing", str(image)], check=True)
        write_cold(image, P2)
    subprocess.run(["qemu-img", "snapshot", "-c", "only-a", str(a)], check=True)
    for image in (a, b):
        write_cold(image, P3)

    listing = {s["name"]: s for s in qs_json(state, "--disk", a, "--disk", b, "list")}
    assert set(listing) == {"pre-existing", "only-a"}
    pre, only = listing["pre-existing"], listing["only-a"]
    assert pre["adopted"] is True and pre["partial"] is False
    assert pre["kind"] == "internal" and pre["memory"] == "none" and pre["parent"] is None
    assert pre["current"] is True  # the newest complete one: the disks came after it
    assert [(d["name"], d["snapshot"], d["file"]) for d in pre["disks"]] == [
        ("a", "internal", str(a)),
        ("b", "internal", str(b)),
    ]
    assert only["adopted"] is True and only["partial"] is True
    assert [d["snapshot"] for d in only["disks"]] == ["internal", "excluded"]
    assert "(adopted)" in qs(state, "list").stdout
    assert qs_json(state, "info", "pre-existing")["adopted"] is True

    # A partial tag cannot be reverted to (the disks would come from different instants).
    refused = qs(state, "revert", "only-a", expect=2)
    assert "partial" in refused.stderr
    assert read_cold(a, P3) and read_cold(b, P3)

    qs(state, "revert", "pre-existing")
    assert read_cold(a, P1) and read_cold(b, P1)
    check_clean(a)
    check_clean(b)

    qs(state, "delete", "only-a")
    assert tags(a) == ["pre-existing"] and tags(b) == ["pre-existing"]

    # Our own snapshot after it: its parent is the adopted one, it is not adopted.
    write_cold(a, P4)
    mine = qs_json(state, "create", "mine")
    assert mine["parent"] == "pre-existing" and mine["adopted"] is False

    # Adopted snapshots are deleted as our own (the tag leaves every image).
    qs(state, "delete", "pre-existing")
    assert tags(a) == ["mine"] and tags(b) == ["mine"]
    qs(state, "revert", "mine")
    assert read_cold(a, P4) and read_cold(b, P1)
    check_clean(a)
    check_clean(b)


def test_adopt_command_places_new_tags_by_date(short_tmp: Path) -> None:
    (a,) = make_disks(short_tmp, ("a",))
    state = short_tmp / "state"
    write_cold(a, P1)
    qs(state, "--disk", a, "create", "ours")
    assert qs_json(state, "list")[0]["adopted"] is False
    write_cold(a, P2)
    subprocess.run(["qemu-img", "snapshot", "-c", "theirs", str(a)], check=True)
    # Not first contact any more: a tag made since is only listed after "adopt".
    assert [s["name"] for s in qs_json(state, "list")] == ["ours"]
    added = qs_json(state, "adopt")
    assert [(s["name"], s["parent"], s["adopted"]) for s in added] == [("theirs", "ours", True)]
    assert qs_json(state, "adopt") == []  # nothing left to adopt
    write_cold(a, P3)
    qs(state, "revert", "theirs")
    assert read_cold(a, P2)
    qs(state, "revert", "ours")
    assert read_cold(a, P1)
    check_clean(a)


@pytest.mark.asyncio
@pytest.mark.qemu_system
async def test_hmp_savevm_adopted_and_reverted_live(short_tmp: Path) -> None:
    images = make_disks(short_tmp, ("vda", "vdb"))
    state = short_tmp / "state"

    machine = Machine(firmware_config(images))
    await machine.launch()
    try:
        monitor = machine.monitor
        for disk in ("vda", "vdb"):
            await write_live(monitor, disk, P1)
        # HMP savevm: another tool's internal checkpoint (disks + VM state in vda).
        reply = await monitor.execute("human-monitor-command", {"command-line": "savevm hmp-one"})
        assert not str(reply).strip(), reply
        for disk in ("vda", "vdb"):
            await write_live(monitor, disk, P2)

        vm = await VM.attach(monitor, state_dir=state)
        try:
            (snap,) = vm.snapshots()
            assert snap.name == "hmp-one" and snap.adopted and not snap.partial
            assert snap.kind is SnapshotKind.INTERNAL and snap.memory is MemoryKind.INTERNAL
            assert snap.current
            reverted = await vm.revert("hmp-one")
            assert reverted.current
            assert vm.monitor is monitor  # snapshot-load in the same QEMU, no restart
            for disk in ("vda", "vdb"):
                assert await read_live(monitor, disk, P1), disk
            assert (await monitor.query_status()).running
            await flush_live(monitor)
            for image in images:
                check_clean(image, in_use=True)
            await vm.delete("hmp-one")
            assert vm.snapshots() == []
        finally:
            vm.store.close()
    finally:
        await machine.shutdown()
    for image in images:
        assert tags(image) == []
        check_clean(image)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_template_chain_is_never_written(short_tmp: Path) -> None:
    """template.qcow2 <- vm.qcow2, made by hand (as libvirt or a user would).  External
    snapshots are taken and deleted in every order; the template keeps its bytes and stays."""
    template = short_tmp / "template.qcow2"
    vm_disk = short_tmp / "vm.qcow2"
    state = short_tmp / "state"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(template), "64M"], check=True)
    write_cold(template, P1)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(template), "-F", "qcow2",
         str(vm_disk)],
        check=True,
    )  # fmt: skip
    before = _sha(template)

    write_cold(vm_disk, P2)
    qs(state, "--disk", vm_disk, "create", "s1", "--disk-only")
    write_cold(qs_json(state, "chain")[0]["images"][0]["filename"], P3)
    qs(state, "create", "s2", "--disk-only")
    chain = qs_json(state, "chain")[0]["images"]
    assert [Path(i["filename"]).name for i in chain][2:] == ["vm.qcow2", "template.qcow2"]
    assert [i["owned"] for i in chain] == [True, True, False, False]
    assert "shared backing file: never written" in qs(state, "chain").stdout

    qs(state, "delete", "s1")  # vm.s1 committed down into vm.qcow2 (the VM's own disk)
    qs(state, "delete", "s2")
    chain = qs_json(state, "chain")[0]["images"]
    assert [Path(i["filename"]).name for i in chain] == ["vm.qcow2", "template.qcow2"]
    assert read_cold(vm_disk, P3)
    assert _sha(template) == before
    check_clean(vm_disk)
    check_clean(template)


def test_a_vm_on_another_vms_frozen_image_adopts_none_of_its_snapshots(short_tmp: Path) -> None:
    """VM b is an overlay made by hand on an image VM a froze (as a clone is): b reads
    through images a's sidecars describe, yet on first contact takes none of a's snapshots,
    nor a's files for its own."""
    (a,) = make_disks(short_tmp, ("a",))
    write_cold(a, P1)
    qs(short_tmp / "state-a", "--disk", a, "create", "s1", "--disk-only")
    b = short_tmp / "b.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(a), "-F", "qcow2", str(b)],
        check=True,
    )
    state_b = short_tmp / "state-b"
    assert qs_json(state_b, "--disk", b, "list") == []
    chain = qs_json(state_b, "chain")[0]["images"]
    assert [(Path(i["filename"]).name, i["owned"]) for i in chain] == [
        ("b.qcow2", False),
        ("a.qcow2", False),
    ]
    assert "shared backing file" in qs(state_b, "chain").stdout
    # a still has its snapshot, b none.
    assert [s["name"] for s in qs_json(short_tmp / "state-a", "list")] == ["s1"]
