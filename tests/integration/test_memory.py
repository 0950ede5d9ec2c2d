"""Memory state with the booted test guest: external checkpoints (stop-and-copy and live),
memory-only save/restore.  The guest's counter lives only in RAM: after a revert it continues
from the value it had at the snapshot."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import attrs
import pytest
from guest import Serial, guest_config
from helpers import resident_fraction
from livevm import make_disks

from qemusnap import VM, Consistency, MemoryKind, SnapshotKind, VMState, hostmem
from qemusnap.agent import GuestAgent
from qemusnap.errors import TargetExistsError
from qemusnap.models import MemoryFormat

pytestmark = [pytest.mark.qemu_system, pytest.mark.guest]


async def boot(tmp: Path, disks: list[Path], *, hugepages: bool = False) -> tuple[VM, Serial]:
    config = attrs.evolve(guest_config(tmp, disks), hugepages=hugepages)
    vm = await VM.launch(config, state_dir=tmp / "state")
    serial = Serial(config.serial_log or "")
    await serial.wait_for(b"qemusnap-guest ready")
    return vm, serial


async def guest_sh(tmp: Path, script: str) -> str:
    async with GuestAgent(str(tmp / "qga.sock"), timeout=30) as agent:
        result = await agent.exec("/bin/sh", ["-c", script], timeout=30)
    return result.stdout.decode()


async def expect_resumed_at(
    vm: VM, serial: Serial, name: str, at_snapshot: int, *, earliest: int | None = None
) -> None:
    """The counter goes on from ``at_snapshot`` (the value when create returned; a live
    checkpoint's RAM is of its start, ``earliest``: the guest ran while RAM was written)."""
    await serial.wait_counter_at_least(at_snapshot + 3)
    serial.mark()
    await vm.revert(name)
    resumed = await serial.next_counter()
    low = at_snapshot if earliest is None else earliest
    assert low <= resumed <= at_snapshot + 1, (name, low, at_snapshot, resumed)
    assert (await vm.run_state()) is VMState.RUNNING


@pytest.mark.parametrize(
    ("live", "hugepages"),
    [(False, False), (True, False), (True, True)],
    ids=["stop-and-copy", "live", "live-hugepages"],
)
@pytest.mark.asyncio
async def test_external_checkpoint_restores_ram(
    short_tmp: Path, live: bool, hugepages: bool
) -> None:
    """Also with guest RAM on huge pages (the flat-pause setup): QEMU's write tracking then
    protects and copies 2 MiB pages, a different path through userfaultfd."""
    disks = make_disks(short_tmp, ["vda"])
    memory = short_tmp / "mem" / "c1.mem"
    memory.parent.mkdir()
    # 256 MiB of guest RAM; the old QEMU is gone before a revert starts the new one.
    reserved = hostmem.huge_pages_free(128) if hugepages else contextlib.nullcontext()

    with reserved:
        vm, serial = await boot(short_tmp, disks, hugepages=hugepages)
        async with vm:
            await serial.wait_counter_at_least(2)
            await guest_sh(short_tmp, "echo before > /tmp/marker; echo before > /mnt/vda/f; sync")
            before = serial.last_counter()
            snap = await vm.create("c1", memory_file=str(memory), live=live)
            at_snapshot = serial.last_counter()
            # Written right after create returned: not part of the snapshot, RAM nor disk.
            await guest_sh(short_tmp, "echo after > /tmp/marker; echo after > /mnt/vda/f; sync")
            assert snap.kind is SnapshotKind.EXTERNAL and snap.memory is MemoryKind.FILE
            assert snap.consistency is Consistency.FULL and snap.memory_file == str(memory)
            assert memory.stat().st_mode & 0o777 == 0o600 and memory.stat().st_size > 0
            assert (await vm.run_state()) is VMState.RUNNING
            with pytest.raises(TargetExistsError):
                await vm.create("c2", memory_file=str(memory))
            for _ in range(2):  # twice: the snapshot survives being reverted to
                await expect_resumed_at(
                    vm, serial, "c1", at_snapshot, earliest=before if live else None
                )
                assert await guest_sh(short_tmp, "cat /tmp/marker /mnt/vda/f") == "before\nbefore\n"
            await vm.delete("c1")
            assert not memory.exists()


@pytest.mark.asyncio
async def test_checkpoint_of_user_paused_vm_stays_paused(short_tmp: Path) -> None:
    disks = make_disks(short_tmp, ["vda"])

    vm, _serial = await boot(short_tmp, disks)
    async with vm:
        assert vm.monitor is not None
        await vm.monitor.stop()
        for name, live in (("p1", False), ("p2", True)):
            snap = await vm.create(name, internal=False, live=live)
            assert snap.vm_state is VMState.PAUSED
            assert snap.memory_file is not None and os.path.exists(snap.memory_file)
            assert (await vm.run_state()) is VMState.PAUSED
        await vm.monitor.cont()
        await vm.revert("p1")  # comes back paused, as taken
        assert (await vm.run_state()) is VMState.PAUSED
        await vm.revert("p1", running=True)
        assert (await vm.run_state()) is VMState.RUNNING


@pytest.mark.asyncio
async def test_save_and_restore_continue_the_counter(short_tmp: Path) -> None:
    disks = make_disks(short_tmp, ["vda"])
    saved = short_tmp / "saved.state"

    vm, serial = await boot(short_tmp, disks)
    async with vm:
        await serial.wait_counter_at_least(2)
        await vm.save(str(saved))
        at_save = serial.last_counter()
        assert vm.monitor is None and saved.stat().st_mode & 0o777 == 0o600
        serial.mark()
        await vm.restore(str(saved))
        resumed = await serial.next_counter()
        assert at_save <= resumed <= at_save + 1
        assert (await vm.run_state()) is VMState.RUNNING
        assert "ok" in await guest_sh(short_tmp, "echo ok")


@pytest.mark.asyncio
async def test_a_mapped_ram_file_leaves_the_page_cache_once_on_disk(short_tmp: Path) -> None:
    """A mapped-ram memory file is dropped from the host page cache once written and synced
    (kept there, each next checkpoint's write got slower: docs/versions.md); a stream file is
    kept (read from disk, a revert right after would take 7x longer).  Either reverts."""
    disks = make_disks(short_tmp, ["vda"])
    vm, serial = await boot(short_tmp, disks)
    async with vm:
        await serial.wait_counter_at_least(1)
        snap = await vm.create("cp", memory_file=str(short_tmp / "cp.mem"))
        at_snapshot = serial.last_counter()
        resident = resident_fraction(short_tmp / "cp.mem")
        if snap.memory_format is MemoryFormat.MAPPED_RAM:
            assert resident < 0.05, resident
        else:
            assert resident > 0.5, resident
        await expect_resumed_at(vm, serial, "cp", at_snapshot)
