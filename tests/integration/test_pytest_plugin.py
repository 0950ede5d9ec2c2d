"""The pytest plugin (qemusnap.pytest_plugin), run by pytester on generated test suites."""

from __future__ import annotations

import textwrap

import pytest
from conftest import GUEST_DIR

pytest_plugins = ["pytester"]

HEADER = "qemusnap: per-test reset by in-place snapshot-load (internal checkpoint)"

# The generated suite's conftest: the golden state is the booted test guest plus /tmp/golden;
# the guest's counter (printed on the serial console every second, kept only in guest RAM) tells
# whether the RAM really went back to the golden snapshot.
CONFTEST = """
    import re
    import time
    from pathlib import Path

    import pytest

    COUNTER = re.compile(rb"qemusnap-counter (\\d+)")


    def counters(vm, offset=0):
        return [int(n) for n in COUNTER.findall(Path(vm.config.serial_log).read_bytes()[offset:])]


    def wait_until(condition, what, timeout=20.0):
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)


    @pytest.fixture(scope="session")
    def qemusnap_prepare(qemusnap_vm):
        assert qemusnap_vm.shell("echo golden > /tmp/golden").exitcode == 0
        wait_until(lambda: counters(qemusnap_vm), "the guest counter")


    @pytest.fixture(scope="session")
    def golden_counter(qemusnap_golden, qemusnap_vm):
        return counters(qemusnap_vm)[-1]


    @pytest.fixture
    def guest(qemusnap_vm, golden_counter, request):
        offset = Path(qemusnap_vm.config.serial_log).stat().st_size
        return request.getfixturevalue("qemusnap_fresh"), offset
"""

TESTS = """
    import pytest
    from conftest import counters, wait_until


    @pytest.mark.parametrize("name", ["a", "b"])
    def test_change_the_guest(guest, golden_counter, name):
        vm, offset = guest
        assert vm.last_reset.method == "in-place snapshot-load"
        # The counter went back to its golden value (the other test left it 3 or more above).
        wait_until(
            lambda: any(n <= golden_counter + 1 for n in counters(vm, offset)),
            f"a counter <= {golden_counter + 1} after the reset",
        )
        # Neither the other test's file nor its process survived the reset; the golden file did.
        assert vm.shell("ls /tmp").stdout.split() == [b"golden"]
        assert b"sleep 42" not in vm.shell("ps").stdout
        number = {"a": 421, "b": 422}[name]
        assert vm.shell(f"touch /tmp/from-{name}; sleep {number} >/dev/null 2>&1 &").exitcode == 0
        assert f"sleep {number}".encode() in vm.shell("ps").stdout
        wait_until(lambda: counters(vm)[-1] >= golden_counter + 3, "the counter to advance")
"""


# pytest-asyncio (a dev extra) warns in every inner run whose ini does not set its loop scope.
_LOOP_SCOPE = ("-o", "asyncio_default_fixture_loop_scope=function")


@pytest.mark.qemu_system
@pytest.mark.guest
def test_each_test_starts_from_the_golden_snapshot(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        f"""
        [pytest]
        qemusnap_kernel = {GUEST_DIR}/vmlinuz
        qemusnap_initrd = {GUEST_DIR}/initrd.img
        filterwarnings = error
        asyncio_default_fixture_loop_scope = function
        """
    )
    pytester.makeconftest(textwrap.dedent(CONFTEST))
    pytester.makepyfile(test_guest=textwrap.dedent(TESTS))
    result = pytester.runpytest_subprocess("-v", "--qemusnap-memory=128", timeout=120)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            HEADER,
            "*test_change_the_guest?a? PASSED*",
            "*test_change_the_guest?b? PASSED*",
            "qemusnap: 2 per-test resets by in-place snapshot-load (internal checkpoint):"
            " mean * ms, max * ms",
        ]
    )


def test_missing_kernel_is_a_clear_error(pytester: pytest.Pytester) -> None:
    ini = pytester.makeini("[pytest]\nqemusnap_kernel = missing/vmlinuz\n")
    pytester.makepyfile(
        """
        def test_one(qemusnap_fresh):
            pass

        def test_two(qemusnap_vm):
            pass
        """
    )
    result = pytester.runpytest(*_LOOP_SCOPE)
    result.assert_outcomes(errors=2)
    message = (
        f"qemusnap: kernel file {pytester.path}/missing/vmlinuz does not exist"
        f" (ini option qemusnap_kernel in {ini})"
    )
    result.stdout.fnmatch_lines([HEADER, message, message])
    result.stdout.no_fnmatch_line("*Traceback*")
    # -q hides the header; the reset line comes after collection then.
    result = pytester.runpytest(*_LOOP_SCOPE, "-q")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines([HEADER, message])


def test_missing_qemu_names_what_to_install(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QEMUSNAP_QEMU", "qemu-system-absent")
    (pytester.path / "vmlinuz").write_bytes(b"")
    pytester.makeini("[pytest]\nqemusnap_kernel = vmlinuz\n")
    pytester.makepyfile("def test_one(qemusnap_fresh):\n    pass\n")
    result = pytester.runpytest(*_LOOP_SCOPE)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "qemusnap: qemu-system-absent not found (QEMUSNAP_QEMU is set): install QEMU*"
            " apt-get install qemu-system-x86*"
        ]
    )


def test_user_config_fixture_overrides_the_ini(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest
        from qemusnap import Drive, MachineConfig

        @pytest.fixture(scope="session")
        def qemusnap_config():
            return MachineConfig(drives=(Drive("/nonexistent/disk.raw", "vda", "raw"),))
        """
    )
    pytester.makepyfile("def test_one(qemusnap_fresh):\n    pass\n")
    result = pytester.runpytest(*_LOOP_SCOPE)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "qemusnap: per-test reset by in-place snapshot-load (internal checkpoint) if every"
            " writable disk is qcow2, else by restart from external checkpoint",
            "qemusnap: disk vda file /nonexistent/disk.raw does not exist"
            " (from the qemusnap_config fixture)",
        ]
    )


def test_nothing_to_boot_and_off_unless_used(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_plain():
            pass

        def test_vm(qemusnap_vm):
            pass
        """
    )
    result = pytester.runpytest(*_LOOP_SCOPE, "-k", "plain")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.no_fnmatch_line("qemusnap: *")
    result = pytester.runpytest(*_LOOP_SCOPE)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["qemusnap: nothing to boot: set the ini option qemusnap_kernel*"])
