"""QEMU killed (SIGKILL) in the middle of an operation (issue 6, item 3): while it writes a
live checkpoint's memory file, while it runs the ``block-commit`` of a delete, while it runs the
``snapshot-save`` job of an internal checkpoint.

Each time: the command fails with a clean one-line error (exit 1); the next command on the cold
disks (the state directory names the VM, or ``--disk``) reconciles the metadata with the images
(the half-made snapshot is absent and its files removed, or the delete is finished); every image
is clean or only leaks (repaired cold); the disks keep the guest's last writes and every
remaining snapshot still reverts to its own bytes.

The moment to kill QEMU is read from the disk: the memory file, or the image being written,
grows past a threshold while the CLI (holding QMP) waits for the job.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from crashrig import (
    DISKS,
    MIB,
    Rig,
    boot_guest,
    check_files,
    check_images,
    check_snapshot_state,
    expect_content,
    run_and_kill,
)

from qemusnap.monitor import Monitor

pytestmark = [pytest.mark.qemu_system, pytest.mark.qemu_img]

P1, P2, P3, P4 = 0x11, 0x22, 0x33, 0x44


def reconcile(rig: Rig, *selector: str) -> dict[str, dict[str, object]]:
    """The next command on the cold disks: recovery, then a consistent listing; images clean
    or leaking only (repaired cold), no file orphaned or missing."""
    rig.qs(*selector, "recover")
    listing = {s["name"]: s for s in rig.qs_json(*selector, "list")}
    leaks = check_images(rig)  # leaks are allowed after a kill: repaired here
    print("leaks repaired:", leaks)
    assert not check_images(rig)
    check_files(rig, listing.values())
    return listing


def expect_reverts(rig: Rig, listing: dict[str, dict[str, object]]) -> None:
    """Every listed snapshot still reverts (cold) to its own bytes."""
    for name in sorted(listing):
        rig.qs("revert", name)
        assert rig.read() == [rig.patterns[name]] * 2, f"after revert {name}\n{rig.describe()}"
    assert not check_images(rig)


@pytest.mark.guest
def test_qemu_killed_while_writing_live_checkpoint(rig: Rig) -> None:
    boot_guest(rig)
    rig.put(P1)
    rig.snap("i1", "--internal", "--disk-only")
    rig.put(P2)
    memory = rig.tmp / "c1.mem"
    error = run_and_kill(
        rig, ["create", "c1", "--memory-file", str(memory), "--live"], memory, 16 * MIB,
        last_write=P4,
    )  # fmt: skip
    assert error.startswith("qemusnap: error:"), error
    listing = reconcile(rig)  # the state directory names the VM; QEMU is gone: cold
    assert set(listing) == {"i1"}
    check_snapshot_state(rig, "c1", listing, made=True)
    assert not memory.exists()
    # The disks kept what was written (after the cut, into the overlays) before QEMU died: the
    # overlays were committed back, not just removed.
    expect_content(rig, [P4])
    expect_reverts(rig, listing)


def test_qemu_killed_during_block_commit(rig: Rig) -> None:
    """Delete e1: its image (the user's base, also holding i1) has one dependent, the active
    overlay with 192 MiB of data: an active block-commit, killed half-way."""
    for disk in rig.disks:
        subprocess.run(["qemu-img", "resize", "-q", str(disk), "256M"], check=True)
    rig.launch()
    rig.put(P1)
    rig.snap("i1", "--internal", "--disk-only")
    rig.put(P2)
    rig.snap("e1", "--disk-only")

    async def fill(monitor: Monitor) -> None:
        for name in DISKS:
            await monitor.qemu_io(name, f"write -P 0x{P3:02x} 0 192M", timeout=120)

    rig.qmp(fill, timeout=120)
    rig.put(P3)
    error = run_and_kill(rig, ["delete", "e1"], rig.disks[0], 32 * MIB, last_write=P4)
    assert error.startswith("qemusnap: error:"), error
    disks = [a for d in rig.disks for a in ("--disk", str(d))]
    listing = reconcile(rig, *disks)
    assert set(listing) == {"i1"}  # the delete was finished: e1 is gone, its overlay too
    assert not [f for f in rig.files() if ".e1." in f]
    assert expect_content(rig, [P4]) == P4  # written during the commit: kept
    for disk in rig.disks:  # every byte the guest wrote is in the base again
        done = subprocess.run(
            ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P 0x{P3:02x} 0 15M", str(disk)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0 and "verification failed" not in done.stdout, done.stdout
    expect_reverts(rig, listing)


@pytest.mark.guest
def test_qemu_killed_during_snapshot_save(rig: Rig) -> None:
    """An internal checkpoint (snapshot-save job writing the guest's RAM into vda.qcow2)."""
    boot_guest(rig)
    rig.put(P1)
    rig.snap("e1", "--disk-only")
    rig.put(P2)
    active = Path(str(rig.disks[0]).replace("vda.qcow2", "vda.e1.qcow2"))
    assert active.exists()
    error = run_and_kill(rig, ["create", "c1"], active, 16 * MIB)
    assert error.startswith("qemusnap: error:"), error
    listing = reconcile(rig)
    assert set(listing) == {"e1"}
    check_snapshot_state(rig, "c1", listing, made=True)
    expect_content(rig, [P2])
    expect_reverts(rig, listing)
