"""The second half of tests/integration/test_upgrade.py, run by a *newer* QEMU's Python (inside
that QEMU's Debian chroot, ``scripts/qemu-chroot run VERSION -- python tests/upgrade_check.py
DIR``): revert to the checkpoint an older QEMU took in DIR, cold (qemusnap restarts QEMU from
the recorded command line), and print what the restored guest shows, as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from guest import COUNTER

from qemusnap import VM
from qemusnap.agent import GuestAgent
from qemusnap.machine import wait_pid_exit


async def check(directory: Path) -> dict[str, object]:
    serial = directory / "serial.log"
    mark = serial.stat().st_size
    async with await VM.cold(state_dir=directory / "state") as vm:
        await vm.revert("c1")
        assert vm.monitor is not None
        monitor = vm.monitor
        deadline = time.monotonic() + 120
        while not COUNTER.findall(serial.read_bytes()[mark:]):
            if time.monotonic() > deadline:
                raise AssertionError("the restored guest printed no counter")
            await asyncio.sleep(0.1)
        resumed = int(COUNTER.findall(serial.read_bytes()[mark:])[0])
        async with GuestAgent(str(directory / "qga.sock"), timeout=60) as agent:
            done = await agent.exec("/bin/sh", ["-c", "cat /mnt/vda/f"], timeout=60)
        result: dict[str, object] = {
            "qemu": (await monitor.capabilities()).version_text,
            "machine": await monitor.machine_type(),
            "state": str(await vm.run_state()),
            "resumed": resumed,
            "file": done.stdout.decode(),
        }
        pid = monitor.peer_pid()
        await monitor.quit()
        vm.monitor = None
        if pid is not None:
            await wait_pid_exit(pid, 30.0)
    return result


if __name__ == "__main__":
    print(json.dumps(asyncio.run(check(Path(sys.argv[1])))))
