"""A lost state directory loses nothing that ``rebuild`` cannot bring back (issue 14, items 2,
3 and 5).

* a tree of 9 snapshots of every kind (internal checkpoint and disk-only, external disk-only,
  external checkpoint, live checkpoint, a branch made by a revert) of the booted test guest:
  ``rm -rf`` of the state directory, ``rebuild``, and ``list --json`` is what it was; every
  snapshot reverts to its byte patterns, checkpoints to their guest counter;
* a state directory that disagrees with the disks: ``check`` reports each difference,
  ``rebuild`` alone only reports, ``rebuild --apply`` repairs the store and never the images;
* ``rebuild`` killed at each of its crash points: running it again finishes the job.

The VM is launched by the test with a QMP socket path, as a user would (tests/crashrig.py):
qemusnap restarts it from the command line it recorded, and the sidecars carry that too.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import GUEST_DIR
from crashrig import MIB, OFFSET, Rig, check_images, listed, wait_status
from guest import COUNTER

from qemusnap.faults import CRASH_POINTS
from qemusnap.store import Store

pytestmark = [pytest.mark.qemu_system, pytest.mark.qemu_img]


def boot(rig: Rig) -> Path:
    """The test guest (its counter on the serial log), no RAM filling: fast checkpoints."""
    serial = rig.tmp / "serial.log"
    rig.launch(
        "-kernel", str(GUEST_DIR / "vmlinuz"), "-initrd", str(GUEST_DIR / "initrd.img"),
        "-append", "console=ttyS0 quiet panic=-1", "-serial", f"file:{serial}",
        memory_mib=256,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while b"qemusnap-counter" not in (serial.read_bytes() if serial.exists() else b""):
        assert time.monotonic() < deadline, "the test guest did not boot"
        time.sleep(0.1)
    return serial


def counters(serial: Path) -> list[int]:
    try:
        return [int(n) for n in COUNTER.findall(serial.read_bytes())]
    except FileNotFoundError:
        return []


def wait_counter(serial: Path, after: int = -1, timeout: float = 60.0) -> int:
    """The first counter value printed beyond the first ``after`` values of the log (a
    restarted QEMU truncates the log, so ``after`` is usually 0 then)."""
    deadline = time.monotonic() + timeout
    while len(values := counters(serial)) <= after:
        assert time.monotonic() < deadline, "the guest counter did not advance"
        time.sleep(0.05)
    return values[after] if after >= 0 else values[-1]


def resumed(serial: Path, mark: int, timeout: float = 60.0) -> int:
    """The counter the guest continued with after a revert: the first value after ``mark``
    that is not above the one before it.  (A restarted QEMU appends to the serial log here;
    if one ever truncates it, the whole new log counts.)"""
    deadline = time.monotonic() + timeout
    while True:
        values = counters(serial)
        start = mark if len(values) >= mark else 0
        for before, after in itertools.pairwise(values[max(start - 1, 0) :]):
            if after <= before:
                return after
        if start == 0 and values:
            return values[0]
        assert time.monotonic() < deadline, f"the guest counter never went back: {values}"
        time.sleep(0.05)


def take(rig: Rig, serial: Path, name: str, *flags: str | Path) -> tuple[int, int]:
    """Snapshot ``name``; the guest counter range it must come back with (checkpoints)."""
    before = counters(serial)[-1]
    rig.snap(name, *flags)
    after = wait_counter(serial, len(counters(serial)))
    return before, after


def test_tree_of_every_kind_survives_a_lost_state_dir(rig: Rig) -> None:
    serial = boot(rig)
    memory = rig.tmp / "memory"
    memory.mkdir()
    clocks: dict[str, tuple[int, int]] = {}

    rig.put(0x11)
    clocks["i1"] = take(rig, serial, "i1")  # internal checkpoint (snapshot-save)
    rig.put(0x22)
    take(rig, serial, "e1", "--disk-only")  # external disk-only
    rig.put(0x33)
    clocks["c1"] = take(rig, serial, "c1", "--memory-file", memory / "c1.mem")
    rig.put(0x44)
    take(rig, serial, "i2", "--internal", "--disk-only")  # internal disk-only, in an overlay
    rig.put(0x55)
    clocks["l1"] = take(rig, serial, "l1", "--memory-file", memory / "l1.mem", "--live")
    # A branch: back to e1 (the guest boots afresh on its disks), then three more.
    rig.qs("revert", "e1", "--force", live=True)
    rig.current, rig.current_snapshot = 0x22, "e1"
    wait_counter(serial, 0)
    rig.put(0x66)
    take(rig, serial, "e2", "--disk-only")
    rig.put(0x77)
    clocks["i3"] = take(rig, serial, "i3")
    rig.put(0x88)
    clocks["c2"] = take(rig, serial, "c2", "--memory-file", memory / "c2.mem")
    rig.put(0x99)
    take(rig, serial, "e3", "--disk-only")
    before = rig.qs_json("list")
    assert len(before) == 9
    assert {(s["kind"], s["memory"]) for s in before} == {
        ("internal", "internal"), ("internal", "none"), ("external", "none"),
        ("external", "file"),
    }  # fmt: skip
    assert sum(s["parent"] == "e1" for s in before) == 2  # the branch
    for path in (rig.tmp / ".qemusnap").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path

    shutil.rmtree(rig.state)
    report = rig.qs_json("rebuild", "--search", memory, live=True)
    assert report["applied"] is True and report["dropped"] == []
    assert len(report["added"]) == 9
    assert rig.qs_json("list") == before
    assert rig.qs_json("rebuild")["applied"] is False  # agrees now: nothing to do
    assert [c for c in rig.qs_json("check") if c["result"] == "mismatch"] == []

    # Every snapshot reverts: its patterns on both disks; a checkpoint its guest counter.
    for snap in before:
        name = snap["name"]
        if name in clocks:
            low, high = clocks[name]
            # Let the guest run past the checkpoint's counter: the revert then shows as the
            # point where the counter goes back.
            while counters(serial)[-1] < high + 3:
                time.sleep(0.2)
            mark = len(counters(serial))
        rig.qs("revert", name, "--force", live=True)
        if name in clocks:
            value = resumed(serial, mark)
            assert low <= value <= high + 1, (name, value, clocks[name], counters(serial))
        assert wait_status(rig, "running") == "running", rig.describe()
        assert rig.read() == [rig.patterns[name]] * 2, f"after revert {name}\n{rig.describe()}"
    assert not check_images(rig)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disagreeing_state_dir_reported_then_repaired(rig: Rig) -> None:
    """The state directory comes back from an old backup ("later" is missing from it), a tag
    was deleted by hand ("gone": its data is gone) and another tool added one ("foreign")."""
    rig.launch()
    rig.put(0x11)
    rig.snap("gone", "--internal", "--disk-only")
    rig.put(0x22)
    rig.qs("save", rig.tmp / "s.state", live=True)  # QEMU stops: the images are free
    backup = rig.tmp / "backup"
    shutil.copytree(rig.state, backup)
    rig.qs("create", "later", live=False)  # qemu-img snapshot -c, recorded with its sidecar
    shutil.rmtree(rig.state)
    shutil.copytree(backup, rig.state)
    for image in rig.disks:
        subprocess.run(["qemu-img", "snapshot", "-d", "gone", str(image)], check=True)
        subprocess.run(["qemu-img", "snapshot", "-c", "foreign", str(image)], check=True)
    before = rig.qs_json("list")
    assert [s["name"] for s in before] == ["gone"]
    images = {image: sha(image) for image in rig.disks}

    mismatches = [c for c in rig.qs_json("check") if c["result"] == "mismatch"]
    found = {(m["snapshot"], m["difference"]) for m in mismatches}
    assert found == {("gone", "only-in-store"), ("later", "only-on-disk"),
                     ("foreign", "only-on-disk"), (None, "current")}, mismatches  # fmt: skip
    report = rig.qs_json("rebuild")
    assert report["applied"] is False and len(report["differences"]) == 4
    assert rig.qs_json("list") == before  # without --apply: reported only

    report = rig.qs_json("rebuild", "--apply")
    assert report["applied"] is True and report["dropped"] == ["gone"]
    after = {s["name"]: s for s in rig.qs_json("list")}
    assert set(after) == {"later", "foreign"}
    assert after["later"]["adopted"] is False and after["later"]["parent"] is None
    assert after["later"]["current"] is True
    assert after["foreign"]["adopted"] is True and after["foreign"]["parent"] == "later"
    assert {image: sha(image) for image in rig.disks} == images  # never the images
    assert [c for c in rig.qs_json("check") if c["result"] == "mismatch"] == []
    for image in rig.disks:
        subprocess.run(
            ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x55 {OFFSET} {MIB}", str(image)],
            check=True,
            capture_output=True,
        )
    rig.qs("revert", "later")
    assert rig.read() == [0x22, 0x22]


@pytest.mark.parametrize("step", CRASH_POINTS["rebuild"])
def test_rebuild_killed_then_run_again(rig: Rig, step: str) -> None:
    rig.launch()
    rig.put(0x11)
    rig.snap("i1", "--internal", "--disk-only")
    rig.put(0x22)
    rig.snap("e1", "--disk-only")
    rig.put(0x33)
    rig.snap("c1", "--memory-file", rig.tmp / "c1.mem")
    rig.put(0x44)
    rig.snap("e2", "--disk-only")
    before = rig.qs_json("list")
    shutil.rmtree(rig.state)

    done = rig.qs("rebuild", live=True, crash=f"rebuild:{step}", expect=None)
    assert done.returncode == -signal.SIGKILL, done.stderr
    report = rig.qs_json("rebuild", live=True)
    assert report["applied"] is (step != "committed"), report
    assert rig.qs_json("list") == before
    sidecars = [json.loads(p.read_text()) for p in (rig.tmp / ".qemusnap").glob("*.json")]
    assert sorted(s["snapshot"]["name"] for s in sidecars) == sorted(s["name"] for s in before)
    for name in ("i1", "e1", "c1", "e2"):
        rig.qs("revert", name, "--force", live=True)
        assert wait_status(rig, "running") == "running", rig.describe()
        assert rig.read() == [rig.patterns[name]] * 2, f"after revert {name}\n{rig.describe()}"
    assert not check_images(rig)
    assert listed(rig).keys() == {s["name"] for s in before}


def test_cold_rebuild_gives_back_disk_names_and_ownership(short_tmp: Path) -> None:
    """Cold (``--disk`` of the active images, named after their files when opened): the disk
    names the snapshots use and the files qemusnap owns come back from the sidecars."""
    state = short_tmp / "state"
    disks = []
    for name in ("a", "b"):
        disk = short_tmp / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
        disks.append(disk)

    def qs(*args: str | Path) -> str:
        argv = [sys.executable, "-m", "qemusnap", "--state", str(state), "--json", *map(str, args)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def write(pattern: int) -> None:
        for chain in json.loads(qs("chain")):
            image = chain["images"][0]["filename"]
            done = subprocess.run(
                ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} 0 {MIB}", image],
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0 and "wrote" in done.stdout, done.stderr

    qs("--disk", disks[0], "--disk", disks[1], "list")
    write(0x11)
    qs("create", "i1")
    write(0x22)
    qs("create", "e1", "--disk-only")
    write(0x33)
    qs("create", "e2", "--disk-only")
    write(0x44)
    # As if QEMU had been attached once: its command line is recorded (for restarts).
    launch = {"argv": ["qemu-system-x86_64", "-m", "64"], "cwd": "/", "qmp_socket": "/nowhere"}
    with Store(state) as store:
        (vm,) = store.vms()
        store.set_vm_info(vm.id, launch=launch)
    before, chains = json.loads(qs("list")), json.loads(qs("chain"))
    active = [c["images"][0]["filename"] for c in chains]
    shutil.rmtree(state)

    report = json.loads(qs("--disk", active[0], "--disk", active[1], "rebuild"))
    assert report["applied"] and sorted(report["added"]) == ["e1", "e2", "i1"]
    assert json.loads(qs("list")) == before
    assert json.loads(qs("chain")) == chains  # disk names and "owned" included
    with Store(state) as store:
        (vm,) = store.vms()
        assert vm.launch == launch
    for name, pattern in (("i1", 0x11), ("e1", 0x22), ("e2", 0x33)):
        qs("revert", name)
        for chain in json.loads(qs("chain")):
            image = chain["images"][0]["filename"]
            done = subprocess.run(
                ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {pattern} 0 {MIB}", image],
                capture_output=True,
                text=True,
            )
            assert "Pattern verification failed" not in done.stdout, (name, chain["disk"])
            assert done.returncode == 0 and "read" in done.stdout, done.stderr
