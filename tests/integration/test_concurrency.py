"""Two qemusnap processes on one VM at the same moment (issue 6, item 6; SPEC safety rule 6).

The first operation is held in the middle deterministically: its ``qemu-img create`` goes through
a wrapper (``$QEMUSNAP_QEMU_IMG``) that waits for a gate file, after the operation took the VM's
lock and journaled itself.  The second process is started then, and the gate opens only once it
is seen waiting (cold: polling the lock file, seen with inotify; live: it waits for the VM's lock
before it connects, as QEMU's QMP socket serves one client at a time).  Both must succeed one
after the other, never interleaved (the wrapper logs every qemu-img run by the qemusnap process
that made it), and the metadata and the images must agree afterwards.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from foreignvm import QEMUSNAP, ForeignVM, assert_one_line, cli, cli_json, wait_until
from livevm import check_clean, firmware_config, flush_live, make_disks, read_live, write_live

from qemusnap import VM
from qemusnap.errors import BusyError
from qemusnap.store import Store, VMLock

pytestmark = [pytest.mark.qemu_img]

_WRAPPER = """\
import os, sys, time
log, gate, real = {log!r}, {gate!r}, {real!r}
with open(log, "a") as f:
    f.write(f"{{os.getppid()}} {{sys.argv[1]}}\\n")
if sys.argv[1] == "create" and not os.path.exists(gate):
    with open(log + ".blocked", "a") as f:
        f.write(f"{{os.getppid()}}\\n")
    while not os.path.exists(gate):
        time.sleep(0.02)
os.execv(real, [real, *sys.argv[1:]])
"""


@attrs.define
class Gate:
    """A qemu-img that stops before ``create`` until :meth:`open` (the gate) is called."""

    directory: Path

    @property
    def log(self) -> Path:
        return self.directory / "qemu-img.log"

    @property
    def env(self) -> dict[str, str]:
        return {"QEMUSNAP_QEMU_IMG": str(self.directory / "qemu-img")}

    def install(self) -> Gate:
        real = shutil.which("qemu-img")
        assert real is not None
        script = _WRAPPER.format(log=str(self.log), gate=str(self.directory / "go"), real=real)
        wrapper = self.directory / "qemu-img"
        wrapper.write_text(f"#!{sys.executable}\n{script}")
        wrapper.chmod(0o755)
        return self

    def blocked(self) -> list[int]:
        try:
            return [int(x) for x in Path(f"{self.log}.blocked").read_text().split()]
        except FileNotFoundError:
            return []

    def open(self) -> None:
        (self.directory / "go").touch()

    def runs(self) -> list[int]:
        """The pid of the qemusnap process behind each qemu-img run, in order."""
        return [int(line.split()[0]) for line in self.log.read_text().splitlines()]


def start(*args: str | Path, state: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*QEMUSNAP, "--state", str(state), *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def finish(process: subprocess.Popen[str]) -> None:
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, f"{process.args!r}: exit {process.returncode}\n{out}\n{err}"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


class Inotify:
    """Counts the opens of one file (``IN_OPEN``), through libc's inotify (ctypes)."""

    IN_OPEN = 0x20

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN) >= 0
        self.opens = 0

    def count(self) -> int:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return self.opens
        while data:
            _wd, mask, _cookie, length = struct.unpack_from("iIII", data)
            self.opens += bool(mask & self.IN_OPEN)
            data = data[16 + length :]
        return self.opens

    def close(self) -> None:
        os.close(self.fd)


def assert_not_interleaved(gate: Gate, first: int, second: int) -> None:
    runs = [pid for pid in gate.runs() if pid in (first, second)]
    assert first in runs and second in runs, runs
    assert runs == sorted(runs, key=lambda pid: pid == second), f"interleaved: {runs}"


def assert_consistent(state: Path, disk: Path, *qmp: str | Path) -> list[dict[str, Any]]:
    """Every snapshot's files exist and lie on the disk's chain, each snapshot's parent is the
    one below it, the chain is well-formed (each image backed by the next) and clean."""
    snaps: list[dict[str, Any]] = cli_json(*qmp, "list", state=state)
    (chain,) = cli_json(*qmp, "chain", state=state)
    files = [i["filename"] for i in chain["images"]]
    assert files[-1] == str(disk)
    for upper, lower in zip(chain["images"], chain["images"][1:], strict=False):
        assert upper["backing_filename"] == lower["filename"], chain
    assert chain["images"][-1]["backing_filename"] is None
    for snap in snaps:
        for d in snap["disks"]:
            assert os.path.exists(d["file"]) and d["file"] in files, (snap, files)
    # external snapshots on one chain: each frozen image is backed by its parent's
    by_name = {s["name"]: s for s in snaps}
    for snap in snaps:
        if snap["parent"] is not None:
            parent_file = by_name[snap["parent"]]["disks"][0]["file"]
            assert files.index(snap["disks"][0]["file"]) < files.index(parent_file), snaps
    with Store(state) as store:
        assert all(not store.journal(v.id) for v in store.vms())
    for image in files:
        check_clean(image, in_use=bool(qmp))
    return snaps


def test_cold_creates_at_once_run_one_after_the_other(
    short_tmp: Path, processes: list[subprocess.Popen[str]]
) -> None:
    (disk,) = make_disks(short_tmp, ["vda"])
    state = short_tmp / "state"
    gate = Gate(short_tmp).install()
    cold = ("--disk", disk)
    cli(*cold, "list", state=state)  # the state directory knows the VM (and its lock file)
    with Store(state) as store:
        (record,) = store.vms()
        lock_path = store.lock_path(record.id)

    first = start(*cold, "create", "a", "--disk-only", state=state, env=gate.env)
    processes.append(first)
    wait_until(lambda: first.pid in gate.blocked(), "the first create to reach qemu-img create")
    holder = lock_path.read_text()
    assert "create a" in holder and f"pid {first.pid}" in holder, holder

    watch = Inotify(lock_path)
    try:
        second = start(*cold, "create", "b", "--disk-only", state=state, env=gate.env)
        processes.append(second)
        # The second polls the lock (open, flock, close) every 0.1 s while the first holds it.
        wait_until(lambda: watch.count() >= 3, "the second create to wait for the lock")
    finally:
        watch.close()
    assert second.poll() is None and first.poll() is None
    gate.open()
    finish(first)
    finish(second)

    assert_not_interleaved(gate, first.pid, second.pid)
    snaps = assert_consistent(state, disk)
    assert [(s["name"], s["parent"], s["current"]) for s in snaps] == [
        ("a", None, False),
        ("b", "a", True),
    ]


@pytest.mark.qemu_system
def test_live_create_and_delete_at_once_run_one_after_the_other(
    short_tmp: Path, processes: list[subprocess.Popen[str]]
) -> None:
    (disk,) = make_disks(short_tmp, ["vda"])
    state = short_tmp / "state"
    gate = Gate(short_tmp).install()
    config = firmware_config([disk], qmp_socket=str(short_tmp / "qmp.sock"))
    with ForeignVM(config, short_tmp / "qemu.log") as vm:
        live = ("--qmp", vm.qmp)
        vm.monitor(lambda m: write_live(m, "vda", 0x11))
        cli(*live, "create", "s0", "--disk-only", state=state)
        vm.monitor(lambda m: write_live(m, "vda", 0x22))

        first = start(*live, "create", "a", "--disk-only", state=state, env=gate.env)
        processes.append(first)
        wait_until(lambda: first.pid in gate.blocked(), "the create to reach qemu-img create")
        second = start(*live, "delete", "s0", state=state, env=gate.env)
        processes.append(second)
        # The second waits for the VM's lock before it connects (QEMU serves one QMP client
        # at a time), or in the socket's accept queue if it got there first.
        time.sleep(1.0)
        assert second.poll() is None and first.poll() is None
        gate.open()
        finish(first)
        finish(second)

        assert_not_interleaved(gate, first.pid, second.pid)
        vm.monitor(flush_live)
        snaps = assert_consistent(state, disk, *live)
        assert [(s["name"], s["parent"], s["current"]) for s in snaps] == [("a", None, True)]
        assert vm.monitor(lambda m: read_live(m, "vda", 0x22))
        vm.monitor(lambda m: write_live(m, "vda", 0x33))
        cli(*live, "revert", "a", "--force", state=state)
        assert vm.monitor(lambda m: read_live(m, "vda", 0x22))
        assert vm.running()


@pytest.mark.asyncio
async def test_busy_error_names_the_running_operation(short_tmp: Path) -> None:
    """While another process holds the VM (simulated: the test holds its lock), an operation
    waits ``lock_timeout`` seconds, then fails with BusyError naming that operation; nothing
    changed."""
    (disk,) = make_disks(short_tmp, ["vda"], size="8M")
    state = short_tmp / "state"

    async with await VM.cold([str(disk)], state_dir=state) as vm:
        lock = VMLock(vm.store.lock_path(vm.record.id), "create big")
        assert lock.try_acquire()
        try:
            vm.lock_timeout = 0.5
            begun = time.monotonic()
            with pytest.raises(BusyError, match=rf"busy: create big \(pid {os.getpid()}"):
                await vm.create("x", disk_only=True)
            assert 0.5 <= time.monotonic() - begun < 5
            with pytest.raises(BusyError, match="create big"):
                await vm.delete("x")
        finally:
            lock.release()
        assert vm.snapshots() == []
        assert sorted(p.name for p in short_tmp.iterdir()) == ["state", "vda.qcow2"]
        await vm.create("x", disk_only=True)  # released: it works
        assert [s.name for s in vm.snapshots()] == ["x"]


def test_cli_busy_error_after_lock_timeout(short_tmp: Path) -> None:
    (disk,) = make_disks(short_tmp, ["vda"], size="8M")
    state = short_tmp / "state"
    cli("--disk", disk, "list", state=state)
    with Store(state) as store:
        lock = VMLock(store.lock_path(store.vms()[0].id), "create big")
    assert lock.try_acquire()
    try:
        done = subprocess.run(
            [*QEMUSNAP, "--state", str(state), "--disk", str(disk), "create", "x"],
            capture_output=True,
            text=True,
            timeout=5,
            env={**os.environ, "QEMUSNAP_LOCK_TIMEOUT": "0.5"},
        )
    except subprocess.TimeoutExpired:
        pytest.fail("the CLI ignored QEMUSNAP_LOCK_TIMEOUT")
    finally:
        lock.release()
    assert done.returncode == 1
    assert_one_line(done.stderr)
    assert "busy" in done.stderr and f"create big (pid {os.getpid()}" in done.stderr


@pytest.mark.asyncio
@pytest.mark.qemu_system
async def test_live_second_process_gets_busy_error_naming_the_operation(short_tmp: Path) -> None:
    (disk,) = make_disks(short_tmp, ["vda"], size="8M")
    state = short_tmp / "state"
    config = firmware_config([disk], qmp_socket=str(short_tmp / "qmp.sock"))

    with ForeignVM(config, short_tmp / "qemu.log") as vm:
        sock = str(vm.qmp)
        # The first qemusnap: attached (holding the monitor) and inside an operation (the lock).
        async with await VM.attach(sock, state_dir=state) as first:
            lock = VMLock(first.store.lock_path(first.record.id), "create big")
            assert lock.try_acquire()
            try:
                with pytest.raises(BusyError, match="create big"):
                    await VM.attach(sock, state_dir=state, timeout=2)
            finally:
                lock.release()
