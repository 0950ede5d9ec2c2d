"""Internal snapshots with the booted test guest: memory really restored, guest agent quiesce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from guest import Serial, guest_config
from livevm import make_disks

from qemusnap import VM, Consistency, VMState
from qemusnap.agent import GuestAgent
from qemusnap.errors import CommandError, SnapshotNotFoundError

pytestmark = [pytest.mark.qemu_system, pytest.mark.guest]


async def boot(tmp: Path, disks: list[Path]) -> tuple[VM, Serial]:
    config = guest_config(tmp, disks)
    vm = await VM.launch(config, state_dir=tmp / "state")
    serial = Serial(config.serial_log or "")
    await serial.wait_for(b"qemusnap-guest ready")
    return vm, serial


@pytest.mark.asyncio
async def test_counter_continues_after_checkpoint_revert(short_tmp: Path) -> None:
    disks = make_disks(short_tmp, ["vda"])

    vm, serial = await boot(short_tmp, disks)
    async with vm:
        await serial.wait_counter_at_least(2)
        snap = await vm.create("c1")
        at_snapshot = serial.last_counter()
        assert snap.vm_state is VMState.RUNNING and snap.consistency is Consistency.FULL
        for _ in range(2):  # twice in a row: the snapshot is not consumed by a revert
            await serial.wait_counter_at_least(at_snapshot + 4)
            serial.mark()
            await vm.revert("c1")
            resumed = await serial.next_counter()
            # The guest was between two prints when saved: it continues with the next one.
            assert at_snapshot <= resumed <= at_snapshot + 1, (at_snapshot, resumed)
            assert (await vm.run_state()) is VMState.RUNNING


@pytest.mark.asyncio
async def test_quiesce_freezes_only_around_the_snapshot(short_tmp: Path) -> None:
    disks = make_disks(short_tmp, ["vda"])

    vm, _ = await boot(short_tmp, disks)
    async with vm:
        assert vm.monitor is not None
        seen: list[str] = []
        execute = vm.monitor.execute

        async def spying(command: str, arguments: Any = None, **kw: Any) -> Any:
            if command == "transaction":
                assert vm.agent is not None
                seen.append(await vm.agent.fsfreeze_status())
                if fail:
                    raise CommandError(command, "GenericError", "injected failure")
            return await execute(command, arguments, **kw)

        vm.monitor.execute = spying  # type: ignore[method-assign]
        fail = False
        snap = await vm.create("q1", disk_only=True, internal=True, quiesce=True)
        assert snap.consistency is Consistency.QUIESCED
        assert seen == ["frozen"]
        async with GuestAgent(str(short_tmp / "qga.sock")) as agent:
            assert await agent.fsfreeze_status() == "thawed"

        fail = True
        with pytest.raises(CommandError, match="injected"):
            await vm.create("q2", disk_only=True, internal=True, quiesce=True)
        assert seen == ["frozen", "frozen"]
        async with GuestAgent(str(short_tmp / "qga.sock")) as agent:
            assert await agent.fsfreeze_status() == "thawed"
        with pytest.raises(SnapshotNotFoundError):
            vm.info("q2")
        (chain,) = await vm.chains()
        assert [s.name for s in chain.active.snapshots] == ["q1"]
        assert (await vm.run_state()) is VMState.RUNNING
