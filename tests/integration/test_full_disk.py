"""Full filesystems (issue 6, item 4): the memory file and the overlays on a small tmpfs the test
mounts.  A failure is a clean one-line error naming the file (exit 1), the partial files are
removed, the VM keeps running, no snapshot is listed; once space is freed the next snapshot works
and reverts.  The CLI drives a QEMU launched "by someone else" (QMP socket path)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import attrs
import pytest
from foreignvm import ForeignVM, cli, cli_json, fill, tmpfs
from guest import Serial, guest_config
from livevm import check_clean, firmware_config, flush_live, make_disks, read_live, write_live

from qemusnap.agent import GuestAgent
from qemusnap.store import Store

pytestmark = [
    pytest.mark.qemu_img,
    pytest.mark.qemu_system,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root"),
]
MIB = 1024 * 1024
# 64 MiB of non-zero guest RAM (a tmpfs file); one copied 1 MiB block: fast under TCG.
FILL_64_MIB = (
    "dd if=/dev/urandom of=/tmp/r bs=1M count=1 2>/dev/null && i=0 &&"
    " while [ $i -lt 64 ]; do cat /tmp/r >> /tmp/fill; i=$((i+1)); done"
)


def images(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.suffix in (".qcow2", ".mem")}


def assert_nothing_half_made(vm: ForeignVM, state: Path, disk: Path, before: set[str]) -> None:
    """No snapshot listed, no journal entry left, the disk back on its only image (clean), no new
    image file beside it, and the VM running."""
    assert cli_json("--qmp", vm.qmp, "list", state=state) == []
    with Store(state) as store:
        assert all(not store.journal(v.id) for v in store.vms())
    (chain,) = cli_json("--qmp", vm.qmp, "chain", state=state)
    assert [i["filename"] for i in chain["images"]] == [str(disk)]
    assert chain["images"][0]["snapshots"] == []
    assert images(disk.parent) == before
    vm.monitor(flush_live)
    check_clean(disk, in_use=True)
    assert vm.running()


async def guest_sh(qga: Path, script: str) -> str:
    async with GuestAgent(str(qga), timeout=30) as agent:
        result = await agent.exec("/bin/sh", ["-c", script], timeout=60)
    assert result.exitcode == 0, result
    return result.stdout.decode()


@pytest.mark.asyncio
@pytest.mark.guest
async def test_memory_file_on_a_full_filesystem(short_tmp: Path) -> None:
    """The RAM of a booted guest (64 MiB of it non-zero) does not fit in the 16 MiB left on the
    filesystem of the memory file: ``create --memory-file`` and ``save`` fail mid-write.

    The CLI runs block this test's loop (nothing else runs in it: the serial log is a file read
    between the steps).  ``assert_nothing_half_made`` and ``vm.running`` go through
    ``ForeignVM.monitor``, a sync helper with its own ``asyncio.run``: they run in a worker
    thread."""
    (disk,) = make_disks(short_tmp, ["vda"])
    state = short_tmp / "state"
    config = attrs.evolve(guest_config(short_tmp, [disk]), qmp_socket=str(short_tmp / "qmp.sock"))
    serial = Serial(config.serial_log or "")
    small = short_tmp / "small"
    with tmpfs(small, "512m"), ForeignVM(config, short_tmp / "qemu.log") as vm:
        await serial.wait_for(b"qemusnap-guest ready")
        # Zero pages cost nothing in a migration stream: make the RAM really take room.
        await guest_sh(short_tmp / "qga.sock", FILL_64_MIB)
        filler = fill(small, leave=16 * MIB)
        before = images(short_tmp)

        memory = small / "c1.mem"
        done = cli("--qmp", vm.qmp, "create", "c1", "--memory-file", memory, state=state, expect=1)
        assert str(memory) in done.stderr and "No space left" in done.stderr, done.stderr
        assert os.listdir(small) == ["filler"]  # the partial memory file is gone
        await asyncio.to_thread(assert_nothing_half_made, vm, state, disk, before)

        saved = small / "saved.state"
        done = cli("--qmp", vm.qmp, "save", saved, state=state, expect=1)
        assert str(saved) in done.stderr and "No space left" in done.stderr, done.stderr
        assert os.listdir(small) == ["filler"]
        await asyncio.to_thread(assert_nothing_half_made, vm, state, disk, before)
        last = serial.last_counter()
        await serial.wait_counter_at_least(last + 1)  # the guest still runs

        filler.unlink()
        cli("--qmp", vm.qmp, "create", "c1", "--memory-file", memory, state=state)
        at_snapshot = serial.last_counter()
        assert memory.stat().st_size > 64 * MIB and memory.stat().st_mode & 0o777 == 0o600
        assert await asyncio.to_thread(vm.running)
        await serial.wait_counter_at_least(at_snapshot + 3)
        serial.mark()
        cli("--qmp", vm.qmp, "revert", "c1", state=state)
        resumed = await serial.next_counter()
        assert at_snapshot <= resumed <= at_snapshot + 1, (at_snapshot, resumed)
        assert await asyncio.to_thread(vm.running)
        assert [s["name"] for s in cli_json("--qmp", vm.qmp, "list", state=state)] == ["c1"]


def test_overlay_on_a_full_filesystem(short_tmp: Path) -> None:
    """``--overlay`` on a filesystem with no room left: not even the qcow2 header fits."""
    (disk,) = make_disks(short_tmp, ["vda"])
    state = short_tmp / "state"
    config = attrs.evolve(firmware_config([disk]), qmp_socket=str(short_tmp / "qmp.sock"))
    small = short_tmp / "small"
    with tmpfs(small, "4m"), ForeignVM(config, short_tmp / "qemu.log") as vm:
        vm.monitor(lambda m: write_live(m, "vda", 0x11))
        filler = fill(small)
        before = images(short_tmp)
        overlay = small / "o1.qcow2"
        done = cli("--qmp", vm.qmp, "create", "o1", "--disk-only", "--overlay", f"vda={overlay}",
                   state=state, expect=1)  # fmt: skip
        assert str(overlay) in done.stderr and "No space left" in done.stderr, done.stderr
        assert os.listdir(small) == ["filler"]
        assert_nothing_half_made(vm, state, disk, before)
        assert vm.monitor(lambda m: read_live(m, "vda", 0x11))

        filler.unlink()
        cli("--qmp", vm.qmp, "create", "o1", "--disk-only", "--overlay", f"vda={overlay}",
            state=state)  # fmt: skip
        assert overlay.stat().st_mode & 0o777 == 0o600
        vm.monitor(lambda m: write_live(m, "vda", 0x22))
        (chain,) = cli_json("--qmp", vm.qmp, "chain", state=state)
        assert [i["filename"] for i in chain["images"]] == [str(overlay), str(disk)]
        cli("--qmp", vm.qmp, "revert", "o1", "--force", state=state)
        assert vm.monitor(lambda m: read_live(m, "vda", 0x11))
        assert vm.running()
        vm.monitor(flush_live)
        for image in cli_json("--qmp", vm.qmp, "chain", state=state)[0]["images"]:
            check_clean(image["filename"], in_use=True)
