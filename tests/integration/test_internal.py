"""Internal snapshots against real QEMU: byte patterns on two disks, live and cold.

Write A, snapshot s1, write B, snapshot s2, write C; revert s1 gives A on both disks, revert s2
gives B, delete s1 and s2 still gives B; ``qemu-img check`` clean after every step.
"""

from __future__ import annotations

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

from qemusnap import VM, MemoryKind, SnapshotKind, VMState
from qemusnap.errors import UnsupportedError

A, B, C = 0xA1, 0xB2, 0xC3
DISKS = ("vda", "vdb")


async def write_both(vm: VM, pattern: int) -> None:
    assert vm.monitor is not None
    for disk in DISKS:
        await write_live(vm.monitor, disk, pattern)


async def expect_both(vm: VM, pattern: int, images: list[Path]) -> None:
    assert vm.monitor is not None
    for disk in DISKS:
        assert await read_live(vm.monitor, disk, pattern), f"{disk} lost pattern {pattern:#x}"
    await flush_live(vm.monitor)
    for image in images:
        check_clean(image, in_use=True)


@pytest.mark.asyncio
@pytest.mark.qemu_system
@pytest.mark.qemu_img
@pytest.mark.parametrize("disk_only", [False, True], ids=["checkpoint", "disk-only"])
async def test_live_two_disks(short_tmp: Path, disk_only: bool) -> None:
    images = make_disks(short_tmp, DISKS)

    async with await VM.launch(firmware_config(images), state_dir=short_tmp / "state") as vm:
        await write_both(vm, A)
        s1 = await vm.create("s1", disk_only=disk_only, internal=True)
        assert s1.kind is SnapshotKind.INTERNAL and s1.parent is None
        assert s1.memory is (MemoryKind.NONE if disk_only else MemoryKind.INTERNAL)
        assert s1.vm_state is VMState.RUNNING
        assert [d.file for d in s1.disks] == [str(p) for p in images]
        await expect_both(vm, A, images)
        await write_both(vm, B)
        s2 = await vm.create("s2", disk_only=disk_only, internal=True)
        assert s2.parent == "s1"
        await write_both(vm, C)
        await expect_both(vm, C, images)

        await vm.revert("s1", force=disk_only)
        await expect_both(vm, A, images)
        assert (await vm.run_state()) is VMState.RUNNING
        assert vm.current() is not None and vm.current().name == "s1"  # type: ignore[union-attr]
        await vm.revert("s2", force=disk_only)
        await expect_both(vm, B, images)

        assert await vm.delete("s1") == ["s1"]
        assert vm.info("s2").parent is None
        await write_both(vm, C)
        await vm.revert("s2", force=disk_only)
        await expect_both(vm, B, images)
        assert [s.name for s in vm.snapshots()] == ["s2"]
        # The tag is gone from the images themselves, not just from the store.
        for chain in await vm.chains():
            assert [s.name for s in chain.active.snapshots] == ["s2"]


@pytest.mark.asyncio
@pytest.mark.qemu_system
async def test_disk_only_revert_of_running_vm_needs_force(short_tmp: Path) -> None:
    images = make_disks(short_tmp, DISKS)

    async with await VM.launch(firmware_config(images), state_dir=short_tmp / "state") as vm:
        await vm.create("d1", disk_only=True, internal=True)
        with pytest.raises(UnsupportedError, match="--force"):
            await vm.revert("d1")
        assert vm.monitor is not None
        pid = vm.machine.pid if vm.machine else None
        await vm.revert("d1", force=True, paused=True)
        assert vm.machine is not None and vm.machine.pid != pid  # a fresh QEMU
        assert (await vm.run_state()) is VMState.PAUSED


@pytest.mark.asyncio
@pytest.mark.qemu_system
async def test_checkpoint_keeps_user_paused_vm_paused(short_tmp: Path) -> None:
    images = make_disks(short_tmp, DISKS)

    async with await VM.launch(firmware_config(images), state_dir=short_tmp / "state") as vm:
        assert vm.monitor is not None
        await vm.monitor.stop()
        snap = await vm.create("p1")
        assert snap.vm_state is VMState.PAUSED
        assert (await vm.run_state()) is VMState.PAUSED
        await vm.monitor.cont()
        await vm.revert("p1")  # comes back in the state it was taken in
        assert (await vm.run_state()) is VMState.PAUSED
        await vm.revert("p1", running=True)
        assert (await vm.run_state()) is VMState.RUNNING


@pytest.mark.asyncio
@pytest.mark.qemu_img
async def test_cold_two_disks(short_tmp: Path) -> None:
    images = make_disks(short_tmp, DISKS)
    state = short_tmp / "state"

    async def step(action: str, name: str, **kwargs: bool) -> None:
        async with await VM.cold([str(p) for p in images], state_dir=state) as vm:
            await getattr(vm, action)(name, **kwargs)
        for image in images:
            check_clean(image)

    def expect(pattern: int) -> None:
        for image in images:
            assert read_cold(image, pattern), f"{image.name} lost pattern {pattern:#x}"

    for image in images:
        write_cold(image, A)
    await step("create", "s1")
    for image in images:
        write_cold(image, B)
    await step("create", "s2")
    for image in images:
        write_cold(image, C)
    await step("revert", "s1")
    expect(A)
    await step("revert", "s2")
    expect(B)
    await step("delete", "s1")
    for image in images:
        write_cold(image, C)
    await step("revert", "s2")
    expect(B)

    async with await VM.cold([], state_dir=state) as vm:  # the store knows the VM
        (only,) = vm.snapshots()
        assert only.name == "s2" and only.vm_state is VMState.SHUTOFF and only.current
        assert [d.name for d in only.disks] == list(DISKS)


@pytest.mark.asyncio
@pytest.mark.qemu_system
async def test_restore_point_reverts_on_exit_and_on_error(short_tmp: Path) -> None:
    images = make_disks(short_tmp, DISKS)

    async with await VM.launch(firmware_config(images), state_dir=short_tmp / "state") as vm:
        await write_both(vm, A)
        async with vm.restore_point("golden") as golden:
            assert golden.memory is MemoryKind.INTERNAL  # taken on entry, in place
            await write_both(vm, B)
        await expect_both(vm, A, images)
        with pytest.raises(ZeroDivisionError):
            async with vm.restore_point("golden"):
                await write_both(vm, C)
                _ = 1 / 0
        await expect_both(vm, A, images)
        assert [s.name for s in vm.snapshots()] == ["golden"]
