"""The same harness from ``async def`` tests (pytest-asyncio): ``qemusnap_afresh`` awaits the
reset to the golden snapshot and gives an :class:`~qemusnap.harness.AsyncVM`, whose coroutines
run in the VM's own event loop, so the test's loop (any loop scope) stays free meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from qemusnap import VM
from qemusnap.harness import AsyncVM


async def sh(vm: AsyncVM, script: str) -> str:
    done = await vm.shell(script)
    assert done.exitcode == 0, (script, done.stdout, done.stderr)
    return done.stdout.decode()


@pytest.mark.asyncio
async def test_async_changes_are_undone(qemusnap_afresh: AsyncVM) -> None:
    vm = qemusnap_afresh
    assert await sh(vm, "cat /tmp/app.conf /mnt/vda/data/v") == "configured\n1\n"
    # Two guest commands at once, from this test's event loop.
    one, two = await asyncio.gather(sh(vm, "echo 3 > /mnt/vda/data/v"), sh(vm, "touch /tmp/x"))
    assert (one, two) == ("", "")
    assert await sh(vm, "cat /mnt/vda/data/v") == "3\n"


@pytest.mark.asyncio
async def test_async_sees_the_golden_state(qemusnap_afresh: AsyncVM) -> None:
    vm = qemusnap_afresh
    assert await sh(vm, "cat /mnt/vda/data/v") == "1\n"
    assert "x" not in (await sh(vm, "ls /tmp")).split()
    report = vm.last_reset
    assert report is not None and report.method == "in-place snapshot-load"


@pytest.mark.asyncio
async def test_async_vm_api(qemusnap_afresh: AsyncVM) -> None:
    """Any coroutine of the :class:`~qemusnap.VM` itself, through ``call``."""

    async def state(vm: VM) -> str:
        return str(await vm.run_state())

    assert await qemusnap_afresh.call(state) == "running"
