"""A VM "launched by someone else" for the reliability tests, driven through the CLI, and the
checks of issue 6 item 1 (the invariants that must hold after any crash and the next command).

The QEMU is started by the test with ``-qmp unix:PATH,server=on,wait=off`` and two qcow2 disks,
as a user would; qemusnap restarts it (revert, restore) from its recorded command line, so a
test may end with a QEMU it did not start itself: :meth:`Rig.close` kills every QEMU whose
command line names the test's directory, by pid.

Byte patterns live in the *last* MiB of each 16 MiB disk (a booted test guest formats and mounts
its virtio disks but never writes there).  They are written through each guest device with HMP
``qemu-io`` and read back over a read-only NBD export (live) or with the ``qemu-io`` binary
(cold): the HMP reply of ``qemu-io`` is no oracle (QEMU-NOTES.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from conftest import GUEST_DIR

from qemusnap.agent import GuestAgent
from qemusnap.faults import ENV
from qemusnap.monitor import Monitor
from qemusnap.store import Store

QEMUSNAP = [sys.executable, "-m", "qemusnap"]
MIB = 1 << 20
DISK_SIZE = 16 * MIB
OFFSET = DISK_SIZE - MIB
DISKS = ("vda", "vdb")
IMAGE_SUFFIXES = (".qcow2", ".mem", ".state")
GUEST_MIB = 384
FILL_MIB = 160  # non-zero guest RAM (in the guest's tmpfs): a memory write takes a moment
_ids = itertools.count()
T = TypeVar("T")


class Rig:
    """One VM of two qcow2 disks in ``tmp``, its QMP socket, a state directory, and what the
    test knows: the pattern each snapshot holds and the pattern the disks hold now."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.sock = tmp / "qmp.sock"
        self.sock2 = tmp / "qmp2.sock"
        self.disks = [tmp / f"{name}.qcow2" for name in DISKS]
        self.patterns: dict[str, int] = {}
        self.current = 0
        self.current_snapshot: str | None = None
        self.history: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        for disk in self.disks:
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(DISK_SIZE)], check=True
            )

    # --- QEMU ---------------------------------------------------------------------------------

    def launch(self, *extra: str, memory_mib: int = 128, wait: bool = True) -> None:
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none",
            "-m", str(memory_mib), "-name", "crash-vm",
        ]  # fmt: skip
        for i, name in enumerate(DISKS):
            argv += [
                "-drive", f"file={self.tmp / f'{name}.qcow2'},if=none,id=drive{i},format=qcow2",
                "-device", f"virtio-blk-pci,drive=drive{i},id={name}",
            ]  # fmt: skip
        # A second monitor, the test's own: QEMU serves one client per monitor, and qemusnap
        # holds the first while an operation runs.
        argv += ["-qmp", f"unix:{self.sock},server=on,wait=off"]
        argv += ["-qmp", f"unix:{self.sock2},server=on,wait=off", *extra]
        log = open(self.tmp / f"qemu{len(self._procs)}.log", "wb")  # noqa: SIM115
        with log:
            self._procs.append(
                subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            )
        if wait:
            self.wait_qmp()

    def wait_qmp(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while (pid := self.pid()) is None:
            assert time.monotonic() < deadline, "QEMU never opened its QMP socket"
            time.sleep(0.05)
        return pid

    def pid(self) -> int | None:
        """The pid of the QEMU behind the QMP socket (SO_PEERCRED), None if none answers."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(str(self.sock))
                creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        return int(struct.unpack("3i", creds)[0])

    def qemu_pids(self) -> list[int]:
        """Every live QEMU whose command line names this test's directory."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"qemu-system-x86_64") and any(
                str(self.tmp).encode() in a for a in argv
            ):
                found.append(int(entry.name))
        return found

    def close(self) -> None:
        for pid in self.qemu_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self._procs:
            proc.kill()
            proc.wait()
        deadline = time.monotonic() + 10
        while self.qemu_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def qmp(
        self,
        action: Callable[[Monitor], Awaitable[T]],
        timeout: float = 60.0,
        *,
        second: bool = False,
    ) -> T:
        """Run ``action`` with a Monitor on QEMU (on its second monitor, free while qemusnap
        holds the first, if ``second``)."""

        async def run() -> T:
            sock = self.sock2 if second else self.sock
            async with await Monitor.connect(str(sock), timeout=10) as monitor:
                return await asyncio.wait_for(action(monitor), timeout)

        return asyncio.run(run())

    def status(self) -> str:
        return self.qmp(lambda m: m.query_status()).status

    # --- the CLI ------------------------------------------------------------------------------

    def qs(
        self,
        *args: str | Path,
        live: bool | None = None,
        crash: str | None = None,
        expect: int | None = 0,
        timeout: float = 180.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``qemusnap --state DIR [--qmp SOCK] ARGS``: ``--qmp`` when ``live`` (default:
        when a QEMU answers on the socket; otherwise the state directory names the VM)."""
        if live is None:
            live = self.pid() is not None
        argv = [*QEMUSNAP, "--state", str(self.state)]
        argv += ["--qmp", str(self.sock)] if live else []
        argv += [str(a) for a in args]
        env = dict(os.environ)
        env.pop(ENV, None)
        if crash:
            env[ENV] = crash
        self.history.append(" ".join(argv[2:]) + (f"  [{ENV}={crash}]" if crash else ""))
        started = time.monotonic()
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        took = time.monotonic() - started
        self.history.append(f"  -> {done.returncode} ({took:.2f} s) {done.stderr.strip()}")
        if expect is not None:
            assert done.returncode == expect, (
                f"{args}: exit {done.returncode}, expected {expect}\n{done.stdout}\n{done.stderr}"
                f"\nhistory:\n" + "\n".join(self.history)
            )
        if expect == 1 or expect == 2:
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        return done

    def qs_json(self, *args: str | Path, live: bool | None = None) -> Any:
        return json.loads(self.qs("--json", *args, live=live).stdout)

    def snap(self, name: str, *flags: str | Path) -> None:
        """Take snapshot ``name`` of the running VM (it holds the current pattern)."""
        self.qs("create", name, *flags, live=True)
        self.patterns[name] = self.current
        self.current_snapshot = name

    # --- patterns -----------------------------------------------------------------------------

    def put(self, pattern: int, *, second: bool = False) -> None:
        """Write ``pattern`` over the last MiB of both disks through the guest devices, and
        flush (as a guest does with data it needs durable)."""

        async def write(monitor: Monitor) -> None:
            for name in DISKS:
                await monitor.qemu_io(name, f"write -P 0x{pattern:02x} {OFFSET} {MIB}")
                await monitor.qemu_io(name, "flush")

        self.qmp(write, second=second)
        self.current = pattern

    def read(self) -> list[int | None]:
        """The pattern each disk holds now (None: no single pattern): live over NBD when a QEMU
        answers, else from the active images the store records."""
        if self.pid() is not None:
            return self.qmp(lambda m: _read_live(m, self.tmp))
        with Store(self.state) as store:
            (vm,) = store.vms()
            files = {d.name: d.file for d in vm.disks}
        return [_pattern_of(["-U", "-f", "qcow2", files[name]]) for name in DISKS]

    def flush(self) -> None:
        async def flush(monitor: Monitor) -> None:
            for disk in await monitor.disks():
                if disk.device and not disk.read_only:
                    await monitor.qemu_io(disk.device, "flush")

        self.qmp(flush)

    # --- what is on disk ----------------------------------------------------------------------

    def files(self) -> set[str]:
        """Every image and memory file under the test directory."""
        return {
            str(p)
            for p in self.tmp.rglob("*")
            if p.is_file() and p.suffix in IMAGE_SUFFIXES and "golden" not in p.name
        }

    def describe(self) -> str:
        return "history:\n" + "\n".join(self.history)


async def _read_live(monitor: Monitor, tmp: Path) -> list[int | None]:
    nodes = {d.name: d.node_name for d in await monitor.disks()}
    sock = tmp / "nbd.sock"
    await monitor.execute(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
    )
    found: list[int | None] = []
    try:
        for name in DISKS:
            export = f"x{next(_ids)}"
            await monitor.execute(
                "block-export-add",
                {"type": "nbd", "id": export, "node-name": nodes[name], "name": export,
                 "writable": False},
            )  # fmt: skip
            try:
                url = f"nbd+unix:///{export}?socket={sock}"
                found.append(await asyncio.to_thread(_pattern_of, ["-f", "raw", url]))
            finally:
                # "hard": qemu-io has exited, but QEMU may not have noticed it yet.
                await monitor.execute("block-export-del", {"id": export, "mode": "hard"})
    finally:
        await monitor.execute("nbd-server-stop")
    return found


def _qemu_io(target: Sequence[str], command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-r", *target, "-c", command], capture_output=True, text=True, timeout=60
    )


def _pattern_of(target: Sequence[str]) -> int | None:
    """The byte the last MiB of an image is filled with, or None if it is not uniform."""
    dump = _qemu_io(target, f"read -v {OFFSET} 16")
    assert dump.returncode == 0, dump.stdout + dump.stderr
    first = dump.stdout.splitlines()[0].split(":", 1)[1].split()[:16]
    if len(set(first)) != 1:
        return None
    pattern = int(first[0], 16)
    full = _qemu_io(target, f"read -P 0x{pattern:02x} {OFFSET} {MIB}")
    if "Pattern verification failed" in full.stdout:
        return None
    assert full.returncode == 0 and f"read {MIB}/{MIB} bytes" in full.stdout, full.stdout
    return pattern


# --- the invariants -----------------------------------------------------------------------------


def qemu_img_json(*args: str) -> Any:
    done = subprocess.run(
        ["qemu-img", *args, "--output=json"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def chain_of(image: str) -> list[str]:
    return [i["filename"] for i in qemu_img_json("info", "-U", "--backing-chain", image)]


def tags_of(image: str) -> list[str]:
    return [s["name"] for s in qemu_img_json("info", "-U", image).get("snapshots", [])]


def check_images(rig: Rig) -> dict[str, int]:
    """``qemu-img check`` of every image under the test directory (after a flush when QEMU
    runs): clean, or leaks only, which are repaired (cold: refused on an image QEMU holds).
    Returns the leaks found (image -> clusters)."""
    if rig.pid() is not None and rig.status() in ("running", "paused"):
        rig.flush()
    leaks: dict[str, int] = {}
    for image in sorted(f for f in rig.files() if f.endswith(".qcow2")):
        done = subprocess.run(
            ["qemu-img", "check", "-U", "--output=json", image],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode == 0:
            continue
        assert done.returncode == 3, f"{image} is corrupt: {done.stdout}{done.stderr}"
        leaks[image] = json.loads(done.stdout).get("leaks", 0)
        repaired = subprocess.run(
            ["qemu-img", "check", "-r", "leaks", image], capture_output=True, text=True, timeout=60
        )
        assert repaired.returncode == 0, (
            f"{image} leaks and cannot be repaired: {repaired.stdout}{repaired.stderr}"
        )
    return leaks


def check_files(rig: Rig, listing: Iterable[dict[str, Any]]) -> None:
    """No file orphaned (each image or memory file under the test directory is a user's
    original disk, or referenced: a snapshot's file, a memory file, the saved state, or an
    image some of those read through) and none missing (everything the store names exists)."""
    with Store(rig.state) as store:
        (vm,) = store.vms()
        registered = set(store.files(vm.id))
        saved = vm.saved
    named: set[str] = {d.file for d in vm.disks}
    for snap in listing:
        named.update(d["file"] for d in snap["disks"] if d["file"])
        if snap["memory_file"]:
            named.add(snap["memory_file"])
    if saved:
        named.add(saved["file"])
    missing = sorted(f for f in named | registered if not os.path.exists(f))
    assert not missing, f"the store names files that do not exist: {missing}\n{rig.describe()}"
    referenced = set(named)
    for file in named:
        if file.endswith(".qcow2"):
            referenced.update(chain_of(file))
    orphans = sorted(rig.files() - referenced - {str(d) for d in rig.disks})
    assert not orphans, f"files nothing refers to: {orphans}\n{rig.describe()}"


def listed(rig: Rig) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in rig.qs_json("list")}


def check_snapshot_state(
    rig: Rig, name: str, listing: dict[str, dict[str, Any]], *, made: bool = False
) -> None:
    """A snapshot is complete and listed, or absent with its files removed (the overlays and
    memory file it was ``made`` with are named after it; a deleted snapshot's images may live
    on as other snapshots' images, which :func:`check_files` covers)."""
    images = [f for f in rig.files() if f.endswith(".qcow2")]
    if name in listing:
        snap = listing[name]
        for disk in snap["disks"]:
            if disk["snapshot"] == "internal":
                assert name in tags_of(disk["file"]), f"{name} listed but not in {disk['file']}"
            assert disk["file"] and os.path.exists(disk["file"])
        if snap["memory"] == "file":
            assert snap["memory_file"] and os.path.getsize(snap["memory_file"]) > 0
        return
    holding = [f for f in images if name in tags_of(f)]
    assert not holding, f"{name} is not listed, yet {holding} hold it\n{rig.describe()}"
    if not made:
        return
    left = sorted(f for f in rig.files() if name in Path(f).name.split("."))
    assert not left, f"{name} is not listed, yet its files remain: {left}\n{rig.describe()}"


def expect_content(rig: Rig, allowed: Sequence[int]) -> int:
    """Both disks hold one of the ``allowed`` patterns, the same one; returns it."""
    found = rig.read()
    assert found[0] == found[1] and found[0] in allowed, (
        f"disks hold {found}, expected one of {[hex(p) for p in allowed]}\n{rig.describe()}"
    )
    assert found[0] is not None
    return found[0]


def wait_status(rig: Rig, wanted: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while (status := rig.status()) != wanted and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


# --- killing things mid-operation ------------------------------------------------------------


def boot_guest(rig: Rig) -> None:
    """The bundled test guest, its RAM filled with ``FILL_MIB`` MiB of non-zero data."""
    serial = rig.tmp / "serial.log"
    rig.launch(
        "-kernel", str(GUEST_DIR / "vmlinuz"), "-initrd", str(GUEST_DIR / "initrd.img"),
        "-append", "console=ttyS0 quiet panic=-1", "-serial", f"file:{serial}",
        "-device", "virtio-serial-pci",
        "-chardev", f"socket,id=qga0,path={rig.tmp / 'qga.sock'},server=on,wait=off",
        "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
        memory_mib=GUEST_MIB,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while b"qemusnap-guest ready" not in (serial.read_bytes() if serial.exists() else b""):
        assert time.monotonic() < deadline, "the test guest did not boot"
        time.sleep(0.1)
    script = (
        "head -c 1048576 /dev/urandom > /tmp/block; i=0; "
        f"while [ $i -lt {FILL_MIB} ]; do cat /tmp/block > /tmp/fill$i; i=$((i + 1)); done; "
        "echo filled"
    )

    async def fill() -> str:
        async with GuestAgent(str(rig.tmp / "qga.sock"), timeout=30) as agent:
            done = await agent.exec("/bin/sh", ["-c", script], timeout=120)
        return done.stdout.decode()

    assert "filled" in asyncio.run(fill())


def run_and_kill(
    rig: Rig,
    args: list[str],
    watched: Path,
    grow: int,
    *,
    last_write: int | None = None,
    victim: str = "qemu",
) -> str:
    """Run ``qemusnap --qmp SOCK ARGS``; once ``watched`` has grown by ``grow`` bytes
    (allocated), write (and flush) ``last_write`` on both disks through the second monitor if
    given, then SIGKILL the ``victim``: QEMU (the command must then fail cleanly: exit 1,
    one line, returned) or qemusnap itself (QEMU goes on with whatever job it was running)."""
    pid = rig.pid()
    assert pid is not None

    def size() -> int:
        try:
            return os.stat(watched).st_blocks * 512
        except FileNotFoundError:
            return 0

    start = size()
    argv = [*QEMUSNAP, "--state", str(rig.state), "--qmp", str(rig.sock), *args]
    rig.history.append(" ".join(argv[2:]) + f"  [{victim} killed]")
    cli = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while size() - start < grow:
            assert cli.poll() is None, f"{args} ended before QEMU was killed: {cli.communicate()}"
            assert time.monotonic() < deadline, f"{watched} never grew by {grow} bytes"
            time.sleep(0.002)
        if last_write is not None:
            rig.put(last_write, second=True)
            assert cli.poll() is None, "the operation ended before QEMU was killed"
        os.kill(pid if victim == "qemu" else cli.pid, signal.SIGKILL)
        out, err = cli.communicate(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    rig.history.append(f"  -> {cli.returncode} {err.strip()}")
    if victim != "qemu":
        assert cli.returncode == -signal.SIGKILL, f"exit {cli.returncode}\n{out}\n{err}"
        return ""
    assert cli.returncode == 1, f"exit {cli.returncode}\n{out}\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    deadline = time.monotonic() + 10
    while rig.qemu_pids():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return lines[0]
