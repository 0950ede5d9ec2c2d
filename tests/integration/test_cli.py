"""The command line as users (and the acceptance tests) drive it: a QEMU someone else launched
with ``-qmp unix:PATH,server=on,wait=off``, and images of stopped VMs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_corrupt_image, make_leaky_image
from livevm import make_disks

QEMUSNAP = [sys.executable, "-m", "qemusnap"]


def run(*args: str | Path, state: Path, expect: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [*QEMUSNAP, "--state", str(state), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == expect, (
        f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    if expect:
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return done


def run_json(*args: str | Path, state: Path) -> object:
    return json.loads(run("--json", *args, state=state).stdout)


@pytest.fixture
def chain3(short_tmp: Path) -> list[Path]:
    """base <- mid <- top, relative backing names resolved by qemu-img."""
    base, mid, top = (short_tmp / n for n in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "32M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid], check=True
    )
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top], check=True
    )
    return [top, mid, base]


@pytest.fixture
def foreign_qemu(short_tmp: Path, chain3: list[Path]) -> Iterator[Path]:
    """A QEMU launched by someone else, QMP on a socket path."""
    sock = short_tmp / "qmp.sock"
    proc = subprocess.Popen(
        [
            "qemu-system-x86_64",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
            "-m",
            "64",
            "-drive",
            f"file={chain3[0]},if=none,id=drive0,format=qcow2",
            "-device",
            "virtio-blk-pci,drive=drive0,id=vda",
            "-qmp",
            f"unix:{sock},server=on,wait=off",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.05)
        yield sock
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.qemu_system
@pytest.mark.qemu_img
def test_chain_json_of_foreign_qemu(
    foreign_qemu: Path, chain3: list[Path], short_tmp: Path
) -> None:
    state = short_tmp / "state"
    chains = run_json("--qmp", foreign_qemu, "chain", state=state)
    assert isinstance(chains, list) and len(chains) == 1
    (chain,) = chains
    assert chain["disk"] == "vda"
    images = chain["images"]
    assert [i["filename"] for i in images] == [str(p) for p in chain3]
    assert [i["backing_filename"] for i in images] == [str(chain3[1]), str(chain3[2]), None]
    assert all(i["format"] == "qcow2" and i["virtual_size"] == 32 * 1024 * 1024 for i in images)
    assert all(i["snapshots"] == [] for i in images)
    text = run("--qmp", foreign_qemu, "chain", "vda", state=state).stdout
    assert text.startswith("vda:") and str(chain3[2]) in text
    run("--qmp", foreign_qemu, "chain", "nope", state=state, expect=2)
    # check works read-only on images in use; repair is refused on them.
    results = run_json("--qmp", foreign_qemu, "check", state=state)
    assert [r["result"] for r in results] == ["ok", "ok", "ok"]  # type: ignore[union-attr]
    run("--qmp", foreign_qemu, "check", "--repair", "leaks", state=state, expect=1)
    run("--disk", chain3[0], "check", "--repair", "leaks", state=state, expect=1)


@pytest.mark.qemu_img
def test_check_tells_ok_leaks_corrupt_and_repairs(short_tmp: Path) -> None:
    state = short_tmp / "state"
    clean, leaky, corrupt = (
        short_tmp / "clean.qcow2",
        short_tmp / "leaky.qcow2",
        short_tmp / "bad.qcow2",
    )
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", clean, "1M"], check=True)
    make_leaky_image(leaky)
    make_corrupt_image(corrupt)
    for image, outcome in ((clean, "ok"), (leaky, "leaks"), (corrupt, "corrupt")):
        (result,) = run_json("--disk", image, "check", state=state)  # type: ignore[misc]
        assert result["filename"] == str(image)
        assert result["result"] == outcome
        assert (result["leaks"] > 0) == (outcome == "leaks")
        assert (result["corruptions"] > 0) == (outcome == "corrupt")
    (fixed,) = run_json("--disk", leaky, "check", "--repair", "leaks", state=state)  # type: ignore[misc]
    assert fixed["leaks_fixed"] > 0
    (after,) = run_json("--disk", leaky, "check", state=state)  # type: ignore[misc]
    assert after["result"] == "ok"


@pytest.mark.qemu_img
def test_cli_internal_lifecycle_and_bad_input(short_tmp: Path) -> None:
    state = short_tmp / "state"
    vda, vdb = make_disks(short_tmp, ("vda", "vdb"), size="8M")
    cold = ("--disk", str(vda), "--disk", str(vdb))
    created = run_json(*cold, "create", "s1", "--description", "first", state=state)
    assert created == {
        **created,  # type: ignore[dict-item]
        "name": "s1",
        "parent": None,
        "kind": "internal",
        "memory": "none",
        "memory_file": None,
        "vm_state": "shutoff",
        "description": "first",
        "current": True,
    }
    assert created["disks"] == [  # type: ignore[index]
        {"name": "vda", "snapshot": "internal", "file": str(vda)},
        {"name": "vdb", "snapshot": "internal", "file": str(vdb)},
    ]
    run_json(*cold, "create", "s2", state=state)
    # The state directory knows the VM now: no --disk needed.
    listing = run_json("list", state=state)
    assert [s["name"] for s in listing] == ["s1", "s2"]  # type: ignore[union-attr,index]
    assert run_json("current", state=state)["name"] == "s2"  # type: ignore[index]
    assert run_json("parent", "s2", state=state)["name"] == "s1"  # type: ignore[index]
    assert run_json("parent", "s1", state=state) is None
    assert [s["name"] for s in run_json("list", "--roots", state=state)] == ["s1"]  # type: ignore[union-attr,index]
    assert [s["name"] for s in run_json("list", "--leaves", state=state)] == ["s2"]  # type: ignore[union-attr,index]
    assert run_json("list", "--external", state=state) == []
    assert "s2 *" in run("list", "--tree", state=state).stdout
    # Bad input: exit 2, one line, nothing changed.
    before = [p.read_bytes() for p in (vda, vdb)]
    for bad in ("a/b", ".x", "", "x" * 201):
        run(*cold, "create", bad, state=state, expect=2)
    run(*cold, "create", "s1", state=state, expect=2)
    run("info", "nope", state=state, expect=2)
    run("revert", "nope", state=state, expect=2)
    run("delete", "nope", state=state, expect=2)
    run("--disk", short_tmp / "missing.qcow2", "list", state=state, expect=2)
    run("save", short_tmp / "mem", state=state, expect=2)
    assert [p.read_bytes() for p in (vda, vdb)] == before
    # A raw disk cannot hold internal snapshots: the error names it.
    raw = short_tmp / "raw.img"
    raw.write_bytes(bytes(1024 * 1024))
    done = run("--disk", raw, "create", "r1", state=short_tmp / "state2", expect=2)
    assert "raw" in done.stderr and str(raw) in done.stderr
    run_json("revert", "s1", state=state)
    assert run_json("current", state=state)["name"] == "s1"  # type: ignore[index]
    assert run_json("delete", "s1", state=state) == {"deleted": ["s1"]}
    assert run_json("info", "s2", state=state)["parent"] is None  # type: ignore[index]


@pytest.mark.qemu_system
@pytest.mark.qemu_img
def test_a_reader_that_leaves_early_is_no_error(short_tmp: Path) -> None:
    """`qemusnap --json list | head -1`: the pipe closes before qemusnap writes; the snapshot
    work is done, so no traceback and exit 0."""
    disk = short_tmp / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, "1M"], check=True)
    state = short_tmp / "state"
    run("--disk", disk, "create", "s1", state=state)
    reader, writer = os.pipe()
    os.close(reader)  # gone before qemusnap writes: its first write meets EPIPE
    try:
        done = subprocess.run(
            [*QEMUSNAP, "--state", str(state), "--disk", str(disk), "--json", "list"],
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(writer)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_cold_mode_refuses_image_in_use(
    foreign_qemu: Path, chain3: list[Path], short_tmp: Path
) -> None:
    done = run("--disk", chain3[0], "create", "s1", state=short_tmp / "state", expect=1)
    assert "in use" in done.stderr


def _peer_pid(sock: Path) -> int:
    import socket as socketlib
    import struct

    with socketlib.socket(socketlib.AF_UNIX) as s:
        s.connect(str(sock))
        creds = s.getsockopt(socketlib.SOL_SOCKET, socketlib.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


async def _with_monitor(sock: Path, action: object) -> object:
    from qemusnap.monitor import Monitor

    async with await Monitor.connect(str(sock)) as monitor:
        return await action(monitor)  # type: ignore[operator]


def _start_foreign_qemu(disk: Path, sock: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A firmware-only QEMU launched "by someone else" (``disk`` as virtio ``vda``, QMP on the
    socket path ``sock``); returns once the socket exists."""
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64",
         *extra,
         "-drive", f"file={disk},if=none,id=drive0,format=qcow2",
         "-device", "virtio-blk-pci,drive=drive0,id=vda",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.05)
    return proc


@pytest.mark.asyncio
@pytest.mark.qemu_system
@pytest.mark.qemu_img
async def test_external_revert_restarts_foreign_qemu(short_tmp: Path) -> None:
    """A QEMU someone else launched: an external revert restarts it from its own command line,
    every argument kept but the disk, detached from qemusnap's output pipes."""
    from livevm import read_live, write_live

    (disk,) = make_disks(short_tmp, ["vda"])
    sock, serial, state = short_tmp / "qmp.sock", short_tmp / "serial.log", short_tmp / "state"
    proc = _start_foreign_qemu(disk, sock, "-name", "foreign-vm", "-serial", f"file:{serial}")
    new_pid = None
    try:
        await _with_monitor(sock, lambda m: write_live(m, "vda", 0x61))
        created = run_json("--qmp", sock, "create", "e1", "--disk-only", state=state)
        assert created["kind"] == "external"  # type: ignore[index]
        assert created["disks"][0]["file"] == str(disk)  # type: ignore[index]
        await _with_monitor(sock, lambda m: write_live(m, "vda", 0x62))
        run("--qmp", sock, "revert", "e1", state=state, expect=2)  # needs --force
        with serial.open("ab") as log:
            log.write(b"console before the revert\n")
        run("--qmp", sock, "revert", "e1", "--force", state=state)
        assert proc.wait(timeout=30) == 0  # the old QEMU quit
        new_pid = _peer_pid(sock)
        argv = Path(f"/proc/{new_pid}/cmdline").read_bytes().split(b"\0")[:-1]
        text = [a.decode() for a in argv]
        assert text[text.index("-name") + 1] == "foreign-vm"
        # The console log is appended to, not truncated by the new QEMU.
        chardev = text[text.index("-serial") + 1].removeprefix("chardev:")
        assert f"file,id={chardev},path={serial},append=on" in text
        assert b"console before the revert" in serial.read_bytes()
        assert text[text.index("-qmp") + 1] == f"unix:{sock},server=on,wait=off"
        drive = text[text.index("-drive") + 1]
        assert drive.startswith("file=") and str(disk) not in drive
        assert await _with_monitor(sock, lambda m: read_live(m, "vda", 0x61))
        status = await _with_monitor(sock, lambda m: m.query_status())
        assert status.running  # type: ignore[attr-defined]
        (chain,) = run_json("--qmp", sock, "chain", state=state)  # type: ignore[misc]
        assert chain["images"][0]["filename"] == drive.split(",")[0][len("file=") :]
        assert chain["images"][-1]["filename"] == str(disk)
        run_json("--qmp", sock, "delete", "e1", state=state)
        (chain,) = run_json("--qmp", sock, "chain", state=state)  # type: ignore[misc]
        assert [i["filename"] for i in chain["images"]] == [str(disk)]  # merged back into base
        assert await _with_monitor(sock, lambda m: read_live(m, "vda", 0x61))
    finally:
        proc.kill()
        proc.wait()
        if new_pid:
            os.kill(new_pid, 9)


@pytest.mark.asyncio
@pytest.mark.qemu_system
@pytest.mark.qemu_img
async def test_cold_revert_of_a_checkpoint_starts_qemu_again(short_tmp: Path) -> None:
    """The VM is off, but qemusnap recorded its command line: a checkpoint comes back in the
    run state it was taken in (QEMU started from that command line, memory loaded)."""
    from livevm import read_live, write_live

    (disk,) = make_disks(short_tmp, ["vda"])
    sock, state = short_tmp / "qmp.sock", short_tmp / "state"
    proc = _start_foreign_qemu(disk, sock)
    new_pid = None
    try:
        await _with_monitor(sock, lambda m: write_live(m, "vda", 0x71))
        run_json("--qmp", sock, "create", "c1", state=state)
        await _with_monitor(sock, lambda m: write_live(m, "vda", 0x72))
        await _with_monitor(sock, lambda m: m.quit())
        assert proc.wait(timeout=30) == 0
        reverted = run_json("revert", "c1", state=state)  # no --qmp: the VM is off
        assert reverted["name"] == "c1"  # type: ignore[index]
        new_pid = _peer_pid(sock)
        assert await _with_monitor(sock, lambda m: read_live(m, "vda", 0x71))
        status = await _with_monitor(sock, lambda m: m.query_status())
        assert status.running  # type: ignore[attr-defined]
    finally:
        proc.kill()
        proc.wait()
        if new_pid:
            os.kill(new_pid, 9)
