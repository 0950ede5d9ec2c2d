"""Command lines as harnesses write them, each through the whole snapshot lifecycle (issue 11).

Each style is a plain ``qemu-system-x86_64`` started by the test with a QMP socket path (as a
user would), firmware only and paused (``-S``): the firmware never runs, so the only writes to
the disks (UEFI NVRAM included) are the test's own.  Through the CLI: external checkpoint,
disk-only snapshot, internal checkpoint, revert to each (QEMU restarts from the recorded command
line), delete each, ``qemu-img check`` of every image.  After every revert the byte pattern is
read THROUGH THE GUEST'S DEVICE: an NBD export of the node the device's block backend sits on,
read with the ``qemu-io`` binary.  A restart that opened an overlay as ``format=raw`` would
show the overlay's qcow2 header there instead of the pattern.  Read-only firmware code and
read-only media must stay attached, on their original files, after every restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest
from foreignvm import ForeignVM, assert_one_line, cli, tree_digest
from livevm import check_clean

from qemusnap.machine import MachineConfig
from qemusnap.monitor import Monitor

pytestmark = [pytest.mark.qemu_system, pytest.mark.qemu_img]

KIB = 1024
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
P1, P2, P3, P4 = 0x11, 0x22, 0x33, 0x44
#: Every pattern covers the first 64 KiB of a disk: the NVRAM of OVMF_VARS_4M is 528 KiB.
LENGTH = 64 * KIB


def raw(tmp: Path, name: str, size: str = "16M") -> Path:
    path = tmp / f"{name}.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), size], check=True)
    return path


def qcow2(tmp: Path, name: str, size: str = "16M") -> Path:
    path = tmp / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def vars_copy(tmp: Path) -> Path:
    path = tmp / "VARS.fd"
    shutil.copyfile(OVMF_VARS, path)
    return path


def seed_iso(tmp: Path) -> Path:
    """A cloud-init NoCloud seed (volume label cidata), as cloud-localds makes it."""
    src = tmp / "seed"
    src.mkdir()
    (src / "meta-data").write_text("instance-id: qs-1\nlocal-hostname: qs\n")
    (src / "user-data").write_text("#cloud-config\n")
    maker = shutil.which("genisoimage") or shutil.which("xorriso")
    assert maker, "genisoimage or xorriso is needed (scripts/setup installs genisoimage)"
    argv = [maker] + (["-as", "genisoimage"] if maker.endswith("xorriso") else [])
    iso = tmp / "seed.iso"
    argv += ["-quiet", "-output", str(iso), "-volid", "cidata", "-joliet", "-rock", str(src)]
    subprocess.run(argv, check=True, capture_output=True)
    return iso


def e(path: Path) -> str:
    """A path in QEMU option syntax (a comma doubled)."""
    return str(path).replace(",", ",,")


@attrs.frozen
class Style:
    """A command-line style: its QEMU arguments (made in the test directory) and the names of
    the writable disks qemusnap shows for it."""

    args: Callable[[Path], list[str]]
    disks: tuple[str, ...]
    machine: str = "q35"
    uefi: bool = False
    #: QEMU 7.2's nvme device blocks migration ("non-migratable device"): no checkpoint of a
    #: VM with one can hold its memory, so its lifecycle takes disk-only snapshots only.
    migratable: bool = True


def _drive_x2(t: Path) -> list[str]:
    opts = "if=virtio,format=qcow2,cache=writeback,discard=unmap"
    a, b = qcow2(t, "a"), qcow2(t, "b")
    return ["-drive", f"file={e(a)},{opts}", "-drive", f"file={e(b)},{opts}"]


def _if_none(t: Path) -> list[str]:
    return [
        "-drive", f"if=none,id=drive-virtio-disk0,file={e(qcow2(t, 'a'))},format=qcow2,"
        "cache=none,aio=threads,detect-zeroes=on",
        "-device", "virtio-blk-pci,drive=drive-virtio-disk0,id=virtio-disk0,bootindex=1,"
        "serial=QS-SERIAL-1",
    ]  # fmt: skip


def _hda(t: Path) -> list[str]:
    return ["-hda", str(qcow2(t, "a")), "-hdb", str(raw(t, "b")), "-cdrom", str(seed_iso(t))]


def _scsi(t: Path) -> list[str]:
    return [
        "-device", "virtio-scsi-pci,id=scsi0",
        "-drive", f"if=none,id=drive-scsi0,file={e(qcow2(t, 'a'))},format=qcow2",
        "-device", "scsi-hd,bus=scsi0.0,drive=drive-scsi0,id=scsi-disk0",
    ]  # fmt: skip


def _yocto(t: Path) -> list[str]:
    rootfs = raw(t, "rootfs")
    return ["-drive", f"file={e(rootfs)},if=virtio,format=raw"]


def _uefi_drive(t: Path) -> list[str]:
    return [
        "-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={e(OVMF_CODE)}",
        "-drive", f"if=pflash,format=raw,unit=1,file={e(vars_copy(t))}",
        "-drive", f"file={e(qcow2(t, 'a'))},if=virtio,format=qcow2",
    ]  # fmt: skip


def _uefi_machine(t: Path) -> list[str]:
    return [
        "-blockdev", f"node-name=code,driver=file,filename={e(OVMF_CODE)},read-only=on",
        "-blockdev", "node-name=code-fmt,driver=raw,file=code,read-only=on",
        "-blockdev", f"node-name=vars,driver=file,filename={e(vars_copy(t))}",
        "-blockdev", "node-name=vars-fmt,driver=raw,file=vars",
        "-machine", "pflash0=code-fmt,pflash1=vars-fmt",
        "-drive", f"file={e(raw(t, 'a'))},if=virtio,format=raw",
    ]  # fmt: skip


def _blockdev_json(t: Path) -> list[str]:
    node = {
        "driver": "raw",
        "node-name": "disk0",
        "discard": "unmap",
        "file": {"driver": "file", "filename": str(raw(t, "a")), "aio": "threads"},
    }
    return ["-blockdev", json.dumps(node), "-device", "virtio-blk-pci,drive=disk0,id=vda"]


def _nvme(t: Path) -> list[str]:
    return [
        "-drive", f"if=none,id=nvm,file={e(raw(t, 'a'))},format=raw",
        "-device", "nvme,drive=nvm,serial=deadbeef,id=nvme0",
    ]  # fmt: skip


def _locking_off(t: Path) -> list[str]:
    return ["-drive", f"file={e(raw(t, 'a'))},if=virtio,format=raw,file.locking=off"]


def _iothread(t: Path) -> list[str]:
    return [
        "-object", "iothread,id=io0",
        "-drive", f"if=none,id=d0,file={e(qcow2(t, 'a'))},format=qcow2",
        "-device", "virtio-blk-pci,drive=d0,id=vda,iothread=io0",
    ]  # fmt: skip


def _seed_on_virtio(t: Path) -> list[str]:
    return [
        "-drive", f"file={e(qcow2(t, 'a'))},if=virtio,format=qcow2",
        "-drive", f"file={e(seed_iso(t))},if=virtio,format=raw,readonly=on",
    ]  # fmt: skip


STYLES = {
    "drive-virtio-x2": Style(_drive_x2, ("virtio0", "virtio1")),
    "drive-if-none-device": Style(_if_none, ("virtio-disk0",)),
    "hda-hdb-cdrom": Style(_hda, ("ide0-hd0", "ide0-hd1"), machine="pc"),
    "virtio-scsi": Style(_scsi, ("scsi-disk0",)),
    "drive-format-raw": Style(_yocto, ("virtio0",)),
    "uefi-pflash-drive": Style(_uefi_drive, ("pflash1", "virtio0"), uefi=True),
    "uefi-machine-pflash": Style(_uefi_machine, ("pflash1", "virtio0"), uefi=True),
    "blockdev-json-raw": Style(_blockdev_json, ("vda",)),
    "nvme": Style(_nvme, ("nvme0",), migratable=False),
    "drive-file-locking-off": Style(_locking_off, ("virtio0",)),
    "iothread": Style(_iothread, ("vda",)),
    "seed-iso-on-virtio": Style(_seed_on_virtio, ("virtio0",)),
}


# --- the guest's view ---------------------------------------------------------------------------


async def _write(monitor: Monitor, names: tuple[str, ...], pattern: int) -> None:
    """Write through each device's own block backend (HMP qemu-io -d), then flush."""
    devices = {d.name: d.device for d in await monitor.disks()}
    for name in names:
        device = devices[name]
        assert device, f"{name} has no guest device: {devices}"
        await monitor.qemu_io(device, f"write -P 0x{pattern:02x} 0 {LENGTH}")
        await monitor.qemu_io(device, "flush")


async def _read(monitor: Monitor, names: tuple[str, ...], sock: Path) -> dict[str, str]:
    """What each device's block backend reads over its first LENGTH bytes, via an NBD export
    of its root node: "0x11" for a uniform pattern, else the first bytes qemu-io dumps."""
    nodes = {d.name: d.node_name for d in await monitor.disks()}
    await monitor.execute(
        "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}}
    )
    found: dict[str, str] = {}
    try:
        for n, name in enumerate(names):
            export = f"x{n}"
            await monitor.execute(
                "block-export-add",
                {"type": "nbd", "id": export, "node-name": nodes[name], "name": export},
            )
            try:
                url = f"nbd+unix:///{export}?socket={sock}"
                found[name] = await asyncio.to_thread(_pattern, url)
            finally:
                await monitor.execute("block-export-del", {"id": export, "mode": "hard"})
    finally:
        await monitor.execute("nbd-server-stop")
    return found


def _pattern(url: str) -> str:
    def io(command: str) -> subprocess.CompletedProcess[str]:
        argv = ["qemu-io", "-r", "-f", "raw", url, "-c", command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    dump = io("read -v 0 16")
    assert dump.returncode == 0, dump.stdout + dump.stderr
    first = dump.stdout.splitlines()[0].split(":", 1)[1].split()[:16]
    full = io(f"read -P 0x{first[0]} 0 {LENGTH}")
    if full.returncode == 0 and "Pattern verification failed" not in full.stdout:
        return f"0x{first[0]}"
    return " ".join(first)


@attrs.define
class Corpus:
    """One style's QEMU, and the CLI against it."""

    tmp: Path
    style: Style
    vm: ForeignVM
    read_only: dict[str, str] = attrs.Factory(dict)

    @classmethod
    def start(cls, tmp: Path, style: Style) -> Corpus:
        args = style.args(tmp)
        config = MachineConfig(
            accel="tcg",
            memory_mib=128,
            machine_type=style.machine,
            qmp_socket=str(tmp / "qmp.sock"),
            extra_args=(*args, "-S"),
        )
        vm = ForeignVM(config, tmp / "qemu.log").start()
        corpus = cls(tmp, style, vm)
        corpus.read_only = corpus.read_only_media()
        return corpus

    def qs(self, *args: str | Path, expect: int = 0) -> subprocess.CompletedProcess[str]:
        return cli("--qmp", self.vm.qmp, *args, state=self.tmp / "state", expect=expect)

    def put(self, pattern: int) -> None:
        self.vm.monitor(lambda m: _write(m, self.style.disks, pattern))

    def read(self) -> dict[str, str]:
        return self.vm.monitor(lambda m: _read(m, self.style.disks, self.tmp / "nbd.sock"))

    def expect(self, pattern: int, after: str) -> None:
        want = {name: f"0x{pattern:02x}" for name in self.style.disks}
        assert self.read() == want, f"after {after}: the guest's devices read wrong bytes"
        assert self.read_only_media() == self.read_only, f"read-only media changed by {after}"

    def read_only_media(self) -> dict[str, str]:
        async def media(monitor: Monitor) -> dict[str, str]:
            return {d.name: d.file for d in await monitor.disks() if d.read_only}

        return self.vm.monitor(media)

    def images(self) -> list[Path]:
        return sorted(p for p in self.tmp.iterdir() if p.suffix in (".qcow2", ".raw", ".fd"))


@pytest.fixture
def corpus_dir() -> Iterator[Path]:
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="qs-c-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _needs_uefi(style: Style) -> None:
    if style.uefi and not OVMF_CODE.exists():
        if os.environ.get("QEMUSNAP_REQUIRE_ALL"):
            pytest.fail("required in CI: OVMF (apt-get install ovmf; scripts/setup does)")
        pytest.skip("OVMF not installed (apt-get install ovmf; scripts/setup does)")


@pytest.mark.parametrize("name", list(STYLES))
def test_lifecycle(corpus_dir: Path, name: str) -> None:
    """External checkpoint, disk-only snapshot, internal checkpoint; revert to each (QEMU
    restarted from the recorded command line), reading the guest's view; delete each; check."""
    style = STYLES[name]
    _needs_uefi(style)
    corpus = Corpus.start(corpus_dir, style)
    try:
        memory = style.migratable
        corpus.put(P1)
        if memory:
            corpus.qs("create", "e1", "--memory-file", corpus_dir / "e1.mem")
        else:
            corpus.qs("create", "e1", "--disk-only")
        corpus.put(P2)
        corpus.qs("create", "d1", "--disk-only")
        corpus.put(P3)
        # The active images are qcow2 overlays now, whatever the style began with.
        corpus.qs("create", "i1", "--internal", *([] if memory else ["--disk-only"]))
        corpus.put(P4)
        corpus.expect(P4, "writing")
        corpus.qs("revert", "e1", "--paused", "--force")
        corpus.expect(P1, "revert e1 (external checkpoint: restart with -incoming defer)")
        corpus.qs("revert", "d1", "--paused", "--force")
        corpus.expect(P2, "revert d1 (disk-only: restart)")
        corpus.qs("revert", "i1", "--paused", "--force")
        corpus.expect(P3, "revert i1 (internal, in images d1 froze: restart on clones)")
        corpus.qs("revert", "e1", "--paused", "--force")
        corpus.expect(P1, "revert e1 again")
        assert corpus.vm.status() in ("paused", "prelaunch")  # -S: the firmware never ran
        for snap in ("i1", "d1", "e1"):
            corpus.qs("delete", snap)
            corpus.expect(P1, f"delete {snap}")
        listing = json.loads(corpus.qs("--json", "list").stdout)
        assert listing == [] or listing.get("snapshots", []) == [], listing

        async def flush(monitor: Monitor) -> None:
            for disk in await monitor.disks():
                if disk.device and not disk.read_only:
                    await monitor.qemu_io(disk.device, "flush")

        corpus.vm.monitor(flush)
        for image in corpus.images():
            if image.suffix == ".qcow2":
                check_clean(image, in_use=True)
    finally:
        corpus.vm.close()


@pytest.mark.parametrize("name", ["uefi-pflash-drive", "uefi-machine-pflash"])
def test_internal_checkpoint_of_raw_nvram_is_refused(corpus_dir: Path, name: str) -> None:
    """An internal checkpoint cannot hold a raw NVRAM: refused in one line that names the
    ways out, before anything changes."""
    style = STYLES[name]
    _needs_uefi(style)
    corpus = Corpus.start(corpus_dir, style)
    try:
        corpus.put(P1)
        listing = corpus.qs("--json", "list").stdout
        before = tree_digest(corpus_dir, skip=[corpus_dir / "state"])
        done = corpus.qs("create", "i1", "--internal", expect=2)
        assert "NVRAM" in done.stderr and "--memory-file" in done.stderr, done.stderr
        assert "qcow2" in done.stderr
        assert tree_digest(corpus_dir, skip=[corpus_dir / "state"]) == before
        assert corpus.qs("--json", "list").stdout == listing
        corpus.expect(P1, "the refused create")
    finally:
        corpus.vm.close()


def test_throwaway_overlays_are_refused(corpus_dir: Path) -> None:
    """``-snapshot``: QEMU writes into temporary overlays it deletes on exit; nothing qemusnap
    saved would survive a restart.  Refused in one line, the state directory untouched."""
    config = MachineConfig(
        accel="tcg",
        memory_mib=128,
        qmp_socket=str(corpus_dir / "qmp.sock"),
        extra_args=("-drive", f"file={e(qcow2(corpus_dir, 'a'))},if=virtio", "-snapshot", "-S"),
    )
    with ForeignVM(config, corpus_dir / "qemu.log") as vm:
        state = corpus_dir / "state"
        for argv in (["list"], ["create", "s1", "--disk-only"], ["create", "s2"]):
            done = cli("--qmp", vm.qmp, *argv, state=state, expect=2)
            assert_one_line(done.stderr)
            assert "-snapshot" in done.stderr, done.stderr
        assert not state.exists() or not any(
            p.name == "qemusnap.db" and p.stat().st_size for p in state.iterdir()
        )


# --- a restart that fails -----------------------------------------------------------------------


def _wrapper(tmp: Path) -> Path:
    """A ``qemu-system-x86_64`` that fails to start (as QEMU does, one line on stderr, exit 1)
    once after ``tmp/fail-once`` appears, and always while ``tmp/broken`` exists.  It runs
    QEMU as itself (``exec -a``), so the command line qemusnap records starts with it."""
    script = tmp / "qemu-wrap"
    script.write_text(
        "#!/bin/bash\n"
        f"if [[ -e {tmp}/broken ]] || rm {tmp}/fail-once 2>/dev/null; then\n"
        '  echo "qemu-system-x86_64: -drive file=...: Could not open backing image" >&2\n'
        "  exit 1\n"
        "fi\n"
        'exec -a "$0" qemu-system-x86_64 "$@"\n'
    )
    script.chmod(0o755)
    return script


def _answers(sock: Path) -> bool:
    import socket

    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def _started(tmp: Path, binary: Path | None = None) -> Corpus:
    style = STYLES["drive-format-raw"]
    config = MachineConfig(
        accel="tcg",
        memory_mib=128,
        qmp_socket=str(tmp / "qmp.sock"),
        extra_args=tuple(style.args(tmp)),
        binary=str(binary) if binary else None,
    )
    corpus = Corpus(tmp, style, ForeignVM(config, tmp / "qemu.log").start())
    corpus.read_only = corpus.read_only_media()
    return corpus


def test_failed_restart_falls_back_to_the_previous_images(corpus_dir: Path) -> None:
    """The new QEMU exits at start: the VM is started again on its previous images and
    command line, running, and the revert fails with QEMU's own message; nothing is left to
    recover, and the next revert does the same (no restart retried behind the user's back)."""
    corpus = _started(corpus_dir, _wrapper(corpus_dir))
    try:
        corpus.put(P1)
        corpus.qs("create", "d1", "--disk-only")
        corpus.put(P2)
        images = corpus.images()
        listing = corpus.qs("--json", "list").stdout
        for attempt in (1, 2):
            (corpus_dir / "fail-once").touch()
            done = corpus.qs("revert", "d1", "--force", expect=1)
            assert "Could not open backing image" in done.stderr, done.stderr
            assert "started again on its previous images" in done.stderr, done.stderr
            assert corpus.vm.status() == "running", f"attempt {attempt}"
            corpus.expect(P2, f"failed revert {attempt}")
            assert corpus.images() == images, "the failed revert left images behind"
            assert corpus.qs("--json", "list").stdout == listing
            corpus.qs("recover")
            assert corpus.vm.status() == "running"
    finally:
        corpus.vm.close()


def test_failed_memory_load_falls_back(corpus_dir: Path) -> None:
    """The restarted QEMU starts but cannot load the checkpoint's memory (a truncated file):
    the same fall-back, and the revert works again once the file is whole."""
    corpus = _started(corpus_dir)
    try:
        corpus.put(P1)
        memory = corpus_dir / "e1.mem"
        corpus.qs("create", "e1", "--memory-file", memory)
        corpus.vm.monitor(lambda m: m.cont())
        corpus.put(P2)
        whole = memory.read_bytes()
        memory.write_bytes(whole[: len(whole) // 2])
        images = corpus.images()
        done = corpus.qs("revert", "e1", expect=1)
        assert_one_line(done.stderr)
        assert corpus.vm.status() == "running"
        corpus.expect(P2, "the failed revert")
        assert corpus.images() == images, "the failed revert left images behind"
        corpus.qs("recover")
        memory.write_bytes(whole)
        corpus.qs("revert", "e1", "--paused")
        corpus.expect(P1, "revert e1 with its memory file whole again")
    finally:
        corpus.vm.close()


def test_recovery_gives_up_after_one_failed_fall_back(corpus_dir: Path) -> None:
    """Neither the new nor the previous command line starts (the binary broke): the revert
    fails, the VM stays stopped on its previous images, and later commands do not retry it."""
    corpus = _started(corpus_dir, _wrapper(corpus_dir))
    try:
        corpus.put(P1)
        corpus.qs("create", "d1", "--disk-only")
        corpus.put(P2)
        (corpus_dir / "broken").touch()
        done = corpus.qs("revert", "d1", "--force", expect=1)
        assert "Could not open backing image" in done.stderr
        assert "the VM is stopped" in done.stderr and "usual command line" in done.stderr
        state = corpus_dir / "state"
        for _ in range(2):  # nothing left to recover: no restart is tried again
            listed = cli("--json", "list", state=state)
            assert json.loads(listed.stdout) and not listed.stderr, listed.stderr
            assert not (corpus_dir / "qmp.sock").exists() or not _answers(corpus_dir / "qmp.sock")
        (corpus_dir / "broken").unlink()
        assert not (corpus_dir / "fail-once").exists()
    finally:
        corpus.vm.close()


# --- the raw style with a booted guest ---------------------------------------------------------


async def _guest_sh(sock: Path, script: str) -> str:
    """Run ``script`` in the guest (busybox sh, through qemu-guest-agent), return its stdout."""
    from qemusnap.agent import GuestAgent

    async with GuestAgent(str(sock), timeout=60) as agent:
        done = await agent.exec("/bin/sh", ["-c", script], timeout=120)
    assert done.exitcode == 0, done
    return done.stdout.decode()


def _wait_ready(serial: Path, after: int, timeout: float = 180.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while b"qemusnap-guest ready" not in (serial.read_bytes() if serial.exists() else b"")[after:]:
        assert time.monotonic() < deadline, "the test guest did not boot"
        time.sleep(0.1)


@pytest.mark.guest
@pytest.mark.asyncio
async def test_raw_drive_with_a_booted_guest(corpus_dir: Path) -> None:
    """Yocto's ``-drive file=rootfs,if=virtio,format=raw``, with the test guest booted (its
    init puts an ext2 filesystem on /dev/vda and mounts it): the guest writes its pattern into
    a file there itself, and reads it back, its page cache dropped, after a checkpoint revert
    (its RAM restored) and after a disk-only revert (a fresh boot, the filesystem mounted again
    from the reverted disk).  Through an overlay opened as raw the guest would find no
    filesystem at all."""
    from conftest import GUEST_DIR

    serial, qga = corpus_dir / "serial.log", corpus_dir / "qga.sock"
    rootfs = raw(corpus_dir, "rootfs")
    config = MachineConfig(
        accel="tcg",
        memory_mib=256,
        machine_type="pc",
        qmp_socket=str(corpus_dir / "qmp.sock"),
        kernel=str(GUEST_DIR / "vmlinuz"),
        initrd=str(GUEST_DIR / "initrd.img"),
        append="console=ttyS0 quiet panic=-1",
        serial_log=str(serial),
        qga_socket=str(qga),
        extra_args=("-drive", f"file={e(rootfs)},if=virtio,format=raw"),
    )

    async def write(pattern: int) -> None:
        # 64 KiB of one byte (tr over /dev/zero), synced to the disk.
        await _guest_sh(
            qga,
            f"head -c {LENGTH} /dev/zero | tr '\\000' '\\{pattern:03o}' > /mnt/vda/p && sync",
        )

    async def read() -> str:
        """ "0x11" if the guest reads 64 KiB of 0x11 from /dev/vda (its page cache dropped),
        else the md5 and the first bytes it reads."""
        out = await _guest_sh(
            qga,
            "echo 3 > /proc/sys/vm/drop_caches;"
            " md5sum /mnt/vda/p; head -c 16 /mnt/vda/p | od -An -tx1",
        )
        lines = out.splitlines()
        if len(lines) != 2:  # no such file: the guest found no filesystem on its disk
            return f"unreadable: {out!r}"
        digest, first = lines[0].split()[0], lines[1].split()
        if (
            len(set(first)) == 1
            and digest == hashlib.md5(bytes.fromhex(first[0]) * LENGTH).hexdigest()
        ):
            return f"0x{first[0]}"
        return f"md5 {digest}, starts {' '.join(first)}"

    with ForeignVM(config, corpus_dir / "qemu.log") as vm:
        state = corpus_dir / "state"
        _wait_ready(serial, 0)
        await write(P1)
        assert await read() == "0x11"
        cli("--qmp", vm.qmp, "create", "e1", "--memory-file", corpus_dir / "e1.mem", state=state)
        await write(P2)
        cli("--qmp", vm.qmp, "create", "d1", "--disk-only", state=state)
        await write(P3)
        assert await read() == "0x33"
        cli("--qmp", vm.qmp, "revert", "e1", state=state)
        assert await read() == "0x11", "the guest reads the overlay, not its disk, after revert e1"
        booted = serial.stat().st_size
        cli("--qmp", vm.qmp, "revert", "d1", "--force", state=state)
        _wait_ready(serial, booted)
        assert await read() == "0x22", "after revert d1 (a fresh boot on the reverted disk)"
        await write(P4)
        assert await read() == "0x44"
        for snap in ("d1", "e1"):
            cli("--qmp", vm.qmp, "delete", snap, state=state)
        assert await read() == "0x44"
