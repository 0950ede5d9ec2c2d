"""The live checkpoint is live, on every QEMU: asserted as an order of events, not a duration.

QEMU 8.0 changed ``bg_migration_vm_start_bh`` from ``vm_start()`` to
``vm_resume(vm_old_state)``: a guest qemusnap paused for the disk cut stayed paused for the
whole RAM write ("live" checkpoints paused a 1 GiB guest for 6.5 s on QEMU 10.0).  This test
fails on that regression whatever the machine's speed:

- the guest's ``RESUME`` comes before the migration's ``completed`` (QMP events, in the order
  QEMU emitted them on the one monitor connection);
- the guest runs while the RAM is written: a guest process prints an ever-growing tick to the
  serial console, and new ticks appear while ``query-migrate`` still says ``active``;
- and disks and RAM are still of one instant: after a revert the ticker continues from the
  tick it had printed last before the ``STOP``, not from one printed after the resume.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from livevm import make_disks
from test_memory import boot, guest_sh

from qemusnap import VMState

pytestmark = [pytest.mark.qemu_system, pytest.mark.guest]

TICK = re.compile(rb"qemusnap-tick (\d+)\r?\n")
#: Non-zero guest RAM (MiB of a 256 MiB guest): zero pages cost QEMU nothing, and a RAM write
#: of a few milliseconds would leave no room to watch the guest run during it.
FILL_MIB = 160


async def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        await asyncio.sleep(0.05)


def ticks(serial_log: Path, start: int = 0) -> list[int]:
    return [int(n) for n in TICK.findall(serial_log.read_bytes()[start:])]


@pytest.mark.asyncio
async def test_live_checkpoint_resumes_guest_before_ram_is_written(short_tmp: Path) -> None:
    disks = make_disks(short_tmp, ["vda"])
    memory = short_tmp / "live.mem"
    log = short_tmp / "serial.log"

    async with asyncio.timeout(600):
        vm, serial = await boot(short_tmp, disks)
        async with vm:
            assert vm.monitor is not None
            monitor = vm.monitor
            await serial.wait_counter_at_least(1)
            await guest_sh(
                short_tmp,
                f"set -e; mkdir -p /mnt/fill; mount -t tmpfs -o size={FILL_MIB + 8}m tmpfs"
                " /mnt/fill; dd if=/dev/urandom of=/tmp/block bs=1M count=1 2>/dev/null;"
                f" i=0; while [ $i -lt {FILL_MIB} ]; do cat /tmp/block > /mnt/fill/f$i;"
                " i=$((i + 1)); done",
            )
            # The ticker: its value lives only in guest RAM, and it prints as fast as it runs.
            await guest_sh(
                short_tmp,
                "sh -c 'i=0; while :; do i=$((i + 1)); echo qemusnap-tick $i; done'"
                " </dev/null >/dev/console 2>&1 &",
            )
            await until(lambda: len(ticks(log)) >= 10, "the ticker did not start")
            # MIGRATION status events are sent only with the "events" capability.
            await monitor.execute(
                "migrate-set-capabilities",
                {"capabilities": [{"capability": "events", "state": True}]},
            )
            order: list[str] = []
            last_before_stop = -1
            ran_during_write = False
            async with monitor.listen("STOP", "RESUME", "MIGRATION") as events:
                create = asyncio.create_task(vm.create("live", memory_file=str(memory), live=True))
                while "MIGRATION completed" not in order:
                    try:
                        # The event may reach us just after create() saw "completed" itself.
                        event = await events.wait(timeout=10.0 if create.done() else 0.02)
                    except TimeoutError:
                        if create.done():
                            create.result()  # create's own error, if it failed
                            break
                        continue
                    kind = event["event"]
                    name = kind if kind != "MIGRATION" else f"MIGRATION {event['data']['status']}"
                    order.append(name)
                    if kind == "STOP":
                        # vCPUs are stopped when STOP is sent: the log holds all they printed.
                        last_before_stop = ticks(log)[-1]
                    if kind == "RESUME" and not ran_during_write:
                        ran_during_write = await _guest_runs_while_writing(monitor, log)
                await create
            assert order.count("STOP") == 1 and order.count("RESUME") == 1, order
            assert "MIGRATION completed" in order, order
            assert order.index("STOP") < order.index("RESUME"), order
            assert order.index("RESUME") < order.index("MIGRATION completed"), (
                f"the guest stayed paused until its RAM was written: {order}"
            )
            assert ran_during_write, "no guest output while QEMU wrote the RAM"
            assert (await vm.run_state()) is VMState.RUNNING
            assert last_before_stop > 0

            # One instant: the reverted guest's ticker goes on from where it was at the STOP.
            mark = log.stat().st_size
            await vm.revert("live")
            await until(lambda: _restarted(ticks(log, mark)) is not None, "no restored tick")
            resumed = _restarted(ticks(log, mark))
            assert resumed is not None
            # +2: the STOP may cut the tick being printed in the middle of its line.
            assert last_before_stop < resumed <= last_before_stop + 2, (
                last_before_stop,
                resumed,
            )
            os.unlink(memory)


async def _guest_runs_while_writing(monitor: object, log: Path) -> bool:
    """New ticks while ``query-migrate`` still reports the RAM write ``active``: the size is
    read before each query, so a tick counted was printed before QEMU said "active"."""
    from qemusnap.monitor import Monitor

    assert isinstance(monitor, Monitor)
    start = log.stat().st_size
    while True:
        grown = log.stat().st_size > start and bool(ticks(log, start))
        status = (await monitor.query_migrate()).get("status")
        if status != "active":
            return False
        if grown:
            return True
        await asyncio.sleep(0.005)


def _restarted(values: list[int]) -> int | None:
    """The tick the restored guest printed first: where the sequence goes back.  Read from the
    line after it, since that first line may be garbled: the old QEMU can quit mid-line, and
    the restored guest's first bytes then finish the old one's cut line in the same log."""
    for i, (before, after) in enumerate(itertools.pairwise(values)):
        if after <= before:
            return values[i + 2] - 1 if i + 2 < len(values) else None
    return None
