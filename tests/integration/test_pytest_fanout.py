"""The pytest plugin under pytest-xdist (boot once, every worker on its own clone) and with
pytest-asyncio (async fixtures in strict and auto mode), run by pytester on generated suites."""

from __future__ import annotations

import textwrap

import pytest
from conftest import GUEST_DIR

pytest_plugins = ["pytester"]

INI = f"""
    [pytest]
    qemusnap_kernel = {GUEST_DIR}/vmlinuz
    qemusnap_initrd = {GUEST_DIR}/initrd.img
    qemusnap_ready = serial:qemusnap-guest ready
    filterwarnings = error
    asyncio_default_fixture_loop_scope = function
    asyncio_default_test_loop_scope = function
"""

CONFTEST = """
    import pytest


    @pytest.fixture(scope="session")
    def qemusnap_prepare(qemusnap_vm):
        # Runs once for the whole run, in the worker that boots: a second run would find
        # /tmp/golden there already and fail.
        assert qemusnap_vm.shell("test ! -e /tmp/golden && echo golden > /tmp/golden").exitcode == 0
"""

XDIST_TESTS = """
    import os
    import time
    from pathlib import Path

    import pytest


    @pytest.mark.parametrize("n", range(4))
    def test_on_a_clone(qemusnap_fresh, n):
        vm = qemusnap_fresh
        worker = os.environ["PYTEST_XDIST_WORKER"]
        # The worker's own clone: its QMP socket and serial log in the worker's clone directory.
        assert vm.config.qmp_socket.endswith(f"/{worker}/qmp.sock")
        serial = Path(vm.config.serial_log)
        assert serial.parent.name == worker
        # It never booted: it started from the checkpoint, after the boot's "ready" (its
        # counter runs, from the checkpoint's value on).
        deadline = time.monotonic() + 30
        while b"qemusnap-counter" not in serial.read_bytes():
            assert time.monotonic() < deadline, "the clone's guest counter does not run"
            time.sleep(0.1)
        assert b"qemusnap-guest ready" not in serial.read_bytes()
        # Per-test reset in the clone, as without xdist: nothing of the previous test is left.
        assert vm.last_reset.method == "in-place snapshot-load"
        assert vm.shell("ls /tmp").stdout.split() == [b"golden"]
        assert vm.shell(f"touch /tmp/from-{n}").exitcode == 0


    def test_vm_alone(qemusnap_vm):
        # Without qemusnap_fresh too: whichever worker runs it, the VM is that worker's clone.
        worker = os.environ["PYTEST_XDIST_WORKER"]
        assert qemusnap_vm.config.qmp_socket.endswith(f"/{worker}/qmp.sock")
        assert qemusnap_vm.shell("cat /tmp/golden").stdout == b"golden\\n"
"""


@pytest.mark.qemu_system
@pytest.mark.guest
def test_xdist_boots_once_and_every_worker_runs_on_a_clone(pytester: pytest.Pytester) -> None:
    pytester.makeini(textwrap.dedent(INI))
    pytester.makeconftest(textwrap.dedent(CONFTEST))
    pytester.makepyfile(test_fanout=textwrap.dedent(XDIST_TESTS))
    result = pytester.runpytest_subprocess("-n", "2", "--qemusnap-memory=128", timeout=300)
    result.assert_outcomes(passed=5)
    result.stdout.fnmatch_lines(
        [
            "qemusnap: guest booted 1 time for 2 xdist workers; 2 clones of the golden"
            " checkpoint, started in mean * s, max * s",
            "qemusnap: 4 per-test resets by in-place snapshot-load (internal checkpoint):*",
        ]
    )


VM_ONLY_TESTS = """
    import os

    import pytest


    @pytest.mark.parametrize("n", range(2))
    def test_vm_only(qemusnap_vm, n):
        worker = os.environ["PYTEST_XDIST_WORKER"]
        assert qemusnap_vm.config.qmp_socket.endswith(f"/{worker}/qmp.sock")
        assert qemusnap_vm.shell("cat /tmp/golden").exitcode == 0
"""


@pytest.mark.qemu_system
@pytest.mark.guest
def test_xdist_without_fresh_still_publishes_the_checkpoint(pytester: pytest.Pytester) -> None:
    """Tests that only ask for ``qemusnap_vm``: the booting worker publishes the golden
    checkpoint at its first test's setup, so the other worker does not wait for its end."""
    pytester.makeini(textwrap.dedent(INI))
    pytester.makeconftest(textwrap.dedent(CONFTEST))
    pytester.makepyfile(test_vm_only=textwrap.dedent(VM_ONLY_TESTS))
    result = pytester.runpytest_subprocess(
        "-n", "2", "--qemusnap-memory=128", "-o", "qemusnap_boot_timeout=60", timeout=300
    )
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["qemusnap: guest booted 1 time for 2 xdist workers; 2 clones of the golden checkpoint*"]
    )


ASYNC_TESTS = """
    import asyncio

    import pytest

    {mark}
    async def test_first(qemusnap_afresh):
        assert (await qemusnap_afresh.shell("ls /tmp")).stdout.split() == [b"golden"]
        await asyncio.gather(qemusnap_afresh.shell("touch /tmp/a"), asyncio.sleep(0.01))
        assert (await qemusnap_afresh.shell("ls /tmp")).stdout.split() == [b"a", b"golden"]

    {mark}
    async def test_second(qemusnap_afresh, qemusnap_avm):
        assert qemusnap_avm.sync is qemusnap_afresh.sync
        assert (await qemusnap_avm.shell("ls /tmp")).stdout.split() == [b"golden"]
        assert qemusnap_afresh.last_reset.method == "in-place snapshot-load"

        async def status(vm):
            return (await vm.monitor.query_status()).status

        assert await qemusnap_avm.call(status) == "running"
"""


@pytest.mark.qemu_system
@pytest.mark.guest
@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_async_fixtures(pytester: pytest.Pytester, mode: str) -> None:
    pytester.makeini(textwrap.dedent(INI) + f"asyncio_mode = {mode}\n")
    pytester.makeconftest(textwrap.dedent(CONFTEST))
    # Strict mode needs the asyncio mark; auto mode takes unmarked async tests.
    mark = "@pytest.mark.asyncio" if mode == "strict" else ""
    pytester.makepyfile(test_async=textwrap.dedent(ASYNC_TESTS).format(mark=mark))
    result = pytester.runpytest_subprocess("-v", "--qemusnap-memory=128", timeout=300)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([f"asyncio: mode=Mode.{mode.upper()}, *"])
    result.stdout.fnmatch_lines(
        ["qemusnap: 2 per-test resets by in-place snapshot-load (internal checkpoint):*"]
    )
