"""External snapshots against real QEMU: overlays, branches, revert and delete anywhere in the
tree, live and cold, on two disks, with byte patterns and ``qemu-img check`` after every step."""

from __future__ import annotations

import os
from pathlib import Path

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

from qemusnap import VM, DiskSnapshotKind, SnapshotKind, VMState
from qemusnap.errors import TargetExistsError, UnsupportedError

DISKS = ("vda", "vdb")
P0, P1, P2, P3, P4, PX = 0x01, 0x11, 0x22, 0x33, 0x44, 0x5A


async def check_all_images(vm: VM) -> None:
    """Every image of every chain: qemu-img check clean (read-only; -U while QEMU runs)."""
    if vm.monitor is not None:
        await flush_live(vm.monitor)
    for chain in await vm.chains():
        for image in chain.images:
            check_clean(image.filename, in_use=vm.live)


class Live:
    """Write/read patterns on a VM qemusnap launched (firmware only)."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm

    async def write(self, pattern: int) -> None:
        assert self.vm.monitor is not None
        for disk in DISKS:
            await write_live(self.vm.monitor, disk, pattern)

    async def expect(self, pattern: int) -> None:
        assert self.vm.monitor is not None
        for disk in DISKS:
            assert await read_live(self.vm.monitor, disk, pattern), f"{disk}: not {pattern:#x}"
        await check_all_images(self.vm)

    async def revert(self, name: str) -> None:
        await self.vm.revert(name, force=True)


class Cold:
    def __init__(self, vm: VM) -> None:
        self.vm = vm

    async def write(self, pattern: int) -> None:
        for disk in await self.vm.disks():
            write_cold(disk.file, pattern)

    async def expect(self, pattern: int) -> None:
        for disk in await self.vm.disks():
            assert read_cold(disk.file, pattern), f"{disk.name}: not {pattern:#x}"
        await check_all_images(self.vm)

    async def revert(self, name: str) -> None:
        await self.vm.revert(name)


async def branch_scenario(io: Live | Cold) -> None:
    """s0, s1, s2 on top, revert s1, write, s3: every snapshot reverts to its exact bytes;
    then delete middle snapshots and every other one still does.

    Deleting s1 exercises the "pull" merge (its image backs two branches: s2's and s3's);
    deleting s0 commits into the user's base; deleting the current snapshot commits the
    running overlay down (an active commit, live)."""
    vm = io.vm
    await io.write(P0)
    await vm.create("s0", disk_only=True)
    await io.write(P1)
    s1 = await vm.create("s1", disk_only=True)
    assert s1.kind is SnapshotKind.EXTERNAL and s1.parent == "s0"
    assert [d.snapshot for d in s1.disks] == [DiskSnapshotKind.EXTERNAL] * 2
    await check_all_images(vm)
    await io.write(P2)
    await vm.create("s2", disk_only=True)
    await io.write(P4)
    await io.revert("s1")
    await io.expect(P1)
    await io.write(P3)
    s3 = await vm.create("s3", disk_only=True)
    assert s3.parent == "s1" and vm.info("s2").parent == "s1"
    await io.write(PX)
    for name, pattern in (("s2", P2), ("s1", P1), ("s0", P0), ("s3", P3), ("s2", P2)):
        await io.revert(name)
        await io.expect(pattern)
    # Overlays are the VM's own files: mode 0600.
    for disk in await vm.disks():
        assert os.stat(disk.file).st_mode & 0o777 == 0o600
    # Delete the branch point: s2 and s3 (its children) keep their data, and so does s0.
    assert await vm.delete("s1") == ["s1"]
    assert vm.info("s2").parent == "s0" and vm.info("s3").parent == "s0"
    for name, pattern in (("s3", P3), ("s0", P0), ("s2", P2)):
        await io.revert(name)
        await io.expect(pattern)
    # Delete the root: its data goes into the user's base, the others keep theirs.
    await vm.delete("s0")
    for name, pattern in (("s3", P3), ("s2", P2)):
        await io.revert(name)
        await io.expect(pattern)
    # Delete the snapshot in use (current, leaf of the running chain): s3 keeps its data.
    await io.write(PX)
    await vm.delete("s2")
    await io.expect(PX)  # deleting never changes the running disk
    await io.revert("s3")
    await io.expect(P3)
    assert [s.name for s in vm.snapshots()] == ["s3"]
    await vm.delete("s3")
    await io.expect(P3)
    # No snapshot left, and no file left behind: the directory holds exactly the images of
    # the disks' chains (the user's bases included).
    in_chains = {image.filename for chain in await vm.chains() for image in chain.images}
    directory = Path((await vm.disks())[0].file).parent
    assert {str(p) for p in directory.glob("*.qcow2")} == in_chains


@pytest.mark.asyncio
@pytest.mark.qemu_system
@pytest.mark.qemu_img
async def test_live_branches_and_deletes(short_tmp: Path) -> None:
    images = make_disks(short_tmp, DISKS)

    async with await VM.launch(firmware_config(images), state_dir=short_tmp / "state") as vm:
        await branch_scenario(Live(vm))
        assert (await vm.run_state()) is VMState.RUNNING
    # Nothing left behind but the VM's own images: base + the overlays still in use.
    left = sorted(p.name for p in short_tmp.glob("*.qcow2"))
    assert "vda.qcow2" in left and "vdb.qcow2" in left


@pytest.mark.asyncio
@pytest.mark.qemu_img
async def test_cold_branches_and_deletes(short_tmp: Path) -> None:
    images = make_disks(short_tmp, DISKS)

    async with await VM.cold([str(p) for p in images], state_dir=short_tmp / "state") as vm:
        await branch_scenario(Cold(vm))


@pytest.mark.asyncio
@pytest.mark.qemu_system
@pytest.mark.qemu_img
async def test_exclude_and_overlay_paths(short_tmp: Path) -> None:
    images = make_disks(short_tmp, DISKS)
    mine = short_tmp / "custom" / "vda-top.qcow2"
    mine.parent.mkdir()
    taken = short_tmp / "taken.qcow2"
    taken.write_bytes(b"precious")

    async with await VM.launch(firmware_config(images), state_dir=short_tmp / "state") as vm:
        with pytest.raises(TargetExistsError):
            await vm.create("bad", disk_only=True, overlays={"vda": str(taken)})
        assert taken.read_bytes() == b"precious"
        assert vm.snapshots() == []
        snap = await vm.create("e1", disk_only=True, exclude=["vdb"], overlays={"vda": str(mine)})
        assert [(d.name, d.snapshot) for d in snap.disks] == [
            ("vda", DiskSnapshotKind.EXTERNAL),
            ("vdb", DiskSnapshotKind.EXCLUDED),
        ]
        disks = {d.name: d.file for d in await vm.disks()}
        assert disks == {"vda": str(mine), "vdb": str(images[1])}
        assert mine.stat().st_mode & 0o777 == 0o600
        await check_all_images(vm)


@pytest.mark.asyncio
@pytest.mark.qemu_img
async def test_reuse_external_needs_matching_backing(short_tmp: Path) -> None:
    (image,) = make_disks(short_tmp, ["vda"])
    ready = short_tmp / "ready.qcow2"
    wrong = short_tmp / "wrong.qcow2"
    os.system(f"qemu-img create -q -f qcow2 -b {image} -F qcow2 {ready}")
    os.system(f"qemu-img create -q -f qcow2 {wrong} 64M")

    async with await VM.cold([str(image)], state_dir=short_tmp / "state") as vm:
        with pytest.raises(UnsupportedError, match="backing file"):
            await vm.create("r0", disk_only=True, overlays={"vda": str(wrong)},
                            reuse_external=True)  # fmt: skip
        await vm.create("r1", disk_only=True, overlays={"vda": str(ready)},
                        reuse_external=True)  # fmt: skip
        assert [d.file for d in await vm.disks()] == [str(ready)]
        write_cold(ready, P2)
        await vm.revert("r1")
        assert read_cold((await vm.disks())[0].file, 0)  # zeroes: the state at r1
        # A reused overlay is not qemusnap's: deleting never unlinks it.
        await vm.delete("r1")
    assert ready.exists()


@pytest.mark.asyncio
@pytest.mark.qemu_img
async def test_mixed_tree_keeps_external_data(short_tmp: Path) -> None:
    images = make_disks(short_tmp, DISKS)

    async with await VM.cold([str(p) for p in images], state_dir=short_tmp / "state") as vm:
        io = Cold(vm)
        await io.write(P1)
        await vm.create("s1")  # internal, inside the base images
        await io.write(P2)
        await vm.create("s2", disk_only=True)  # external: the base images are frozen
        await io.write(P3)
        await vm.revert("s1")
        await io.expect(P1)
        await vm.revert("s2")
        await io.expect(P2)
        await vm.revert("s1")
        await io.expect(P1)


@pytest.mark.asyncio
@pytest.mark.qemu_system
@pytest.mark.qemu_img
async def test_live_mixed_tree_keeps_external_data(short_tmp: Path) -> None:
    """Internal checkpoint s1, external s2 (freezing the images holding s1), revert s1: the
    frozen images are cloned, never written, so s2 keeps its data."""
    images = make_disks(short_tmp, DISKS)

    async with await VM.launch(firmware_config(images), state_dir=short_tmp / "state") as vm:
        io = Live(vm)
        await io.write(P1)
        await vm.create("s1")  # internal checkpoint (RAM inside vda.qcow2)
        await io.write(P2)
        await vm.create("s2", disk_only=True)
        await io.write(P3)
        for name, pattern in (("s1", P1), ("s2", P2), ("s1", P1), ("s2", P2)):
            await io.revert(name)
            await io.expect(pattern)
            assert (await vm.run_state()) is VMState.RUNNING
        # The clones carry no stray copy of s1: its only home is the frozen base.
        for chain in await vm.chains():
            assert chain.active.snapshots == ()
            assert [s.name for s in chain.base.snapshots] == ["s1"]
        await vm.delete("s2")
        await vm.revert("s1")
        await io.expect(P1)


@pytest.mark.asyncio
@pytest.mark.qemu_img
async def test_delete_with_children_leaves_no_orphan(short_tmp: Path) -> None:
    """Branches, reverts and an internal snapshot on an abandoned overlay: deleting a subtree
    leaves exactly the images still in use, nothing owned by no one."""
    (image,) = make_disks(short_tmp, ["vda"])

    async with await VM.cold([str(image)], state_dir=short_tmp / "state") as vm:
        io = Cold(vm)
        for step, pattern in (("ext1", P0), ("cp1", P1)):
            await io.write(pattern)
            await vm.create(step, disk_only=True)
        await vm.revert("ext1")
        await io.write(P2)
        await vm.create("ext2", disk_only=True)
        await vm.revert("cp1")
        await io.expect(P1)
        await vm.create("halt1", disk_only=True)
        await io.write(P3)
        await vm.create("offline")  # internal, in halt1's overlay
        await vm.revert("ext2")
        await io.expect(P2)
        assert await vm.delete("cp1", children=True) == ["offline", "halt1", "cp1"]
        in_chains = {i.filename for chain in await vm.chains() for i in chain.images}
        kept = {str(p) for p in short_tmp.glob("*.qcow2")}
        assert kept == in_chains | {vm.info("ext1").disks[0].file}
        for name, pattern in (("ext2", P2), ("ext1", P0)):
            await vm.revert(name)
            await io.expect(pattern)


@pytest.mark.asyncio
@pytest.mark.qemu_system
@pytest.mark.qemu_img
@pytest.mark.parametrize("memory", [False, True], ids=["disk-only", "checkpoint"])
async def test_halt_stops_qemu_after_the_snapshot(short_tmp: Path, memory: bool) -> None:
    """``--halt``: the snapshot is taken, then QEMU quits (the VM is off, nothing paused is
    left behind).  Reverting the checkpoint starts QEMU again from its config; the disk-only
    snapshot reverts the disks of the VM that stays off."""
    disks = make_disks(short_tmp, list(DISKS))

    async with await VM.launch(firmware_config(disks), state_dir=short_tmp / "state") as vm:
        io = Live(vm)
        await io.write(P1)
        assert vm.machine is not None
        process = vm.machine.pid
        mem = str(short_tmp / "h1.mem") if memory else None
        snap = await vm.create("h1", disk_only=not memory, memory_file=mem, halt=True)
        assert vm.monitor is None and not vm.live
        assert process is not None and not os.path.exists(f"/proc/{process}")
        assert snap.vm_state is VMState.RUNNING and [s.name for s in vm.snapshots()] == ["h1"]
        await vm.revert("h1")
        assert vm.live is memory
        if memory:
            assert (await vm.run_state()) is VMState.RUNNING
            await io.expect(P1)
        else:
            await Cold(vm).expect(P1)
