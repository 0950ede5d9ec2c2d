"""Each test changes the guest (files in RAM and on disk, processes) and starts from the golden
state all the same: ``qemusnap_fresh`` reverts the VM to the golden snapshot before each test."""

from __future__ import annotations

from qemusnap.harness import SyncVM


def sh(vm: SyncVM, script: str) -> str:
    done = vm.shell(script)
    assert done.exitcode == 0, (script, done.stdout, done.stderr)
    return done.stdout.decode()


def assert_golden(vm: SyncVM) -> None:
    """What qemusnap_prepare set up is there, and nothing any test did."""
    assert sh(vm, "cat /tmp/app.conf /mnt/vda/data/v") == "configured\n1\n"
    assert sh(vm, "ls /tmp /mnt/vda/data").split() == ["/mnt/vda/data:", "v", "/tmp:", "app.conf"]
    assert "sleep 4242" not in sh(vm, "ps")


def test_files_in_ram_and_on_disk(qemusnap_fresh: SyncVM) -> None:
    vm = qemusnap_fresh
    assert_golden(vm)
    sh(vm, "rm /tmp/app.conf && echo 2 > /mnt/vda/data/v && touch /tmp/junk /mnt/vda/data/junk")
    assert sh(vm, "cat /mnt/vda/data/v") == "2\n"


def test_processes(qemusnap_fresh: SyncVM) -> None:
    vm = qemusnap_fresh
    assert_golden(vm)
    sh(vm, "sleep 4242 >/dev/null 2>&1 &")
    assert "sleep 4242" in sh(vm, "ps")


def test_reset_is_in_place(qemusnap_fresh: SyncVM) -> None:
    assert_golden(qemusnap_fresh)
    report = qemusnap_fresh.last_reset
    assert report is not None and report.method == "in-place snapshot-load"
    sh(qemusnap_fresh, "rm -rf /mnt/vda/data")
