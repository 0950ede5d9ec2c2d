"""Clones of an external checkpoint: independent VMs next to a source that keeps running.

Oracles: the guest's counter (lives in RAM only: a clone continues from the checkpoint's value,
a fresh boot would start again from 1), byte patterns written through each QEMU's own device
and read back over NBD, ``qemu-img check`` of every image.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from foreignvm import QEMUSNAP, ForeignVM, cli, cli_json, peer_pid, wait_until
from guest import Serial, guest_config
from livevm import check_clean, firmware_config, make_disks, read_cold, read_live, write_live

from qemusnap import VM
from qemusnap.errors import StoreError, UnsupportedError
from qemusnap.machine import pid_alive, wait_pid_exit
from qemusnap.monitor import Monitor
from qemusnap.store import Store

pytestmark = [pytest.mark.qemu_system, pytest.mark.qemu_img]

# The booted test guest formats and mounts its disk (ext4 metadata lands in the first MiB at any
# time): the byte patterns go to the last MiB of the 64 MiB disk, which it never writes.
AT = 63 * 1024 * 1024


async def _stop(vm: VM) -> None:
    """Quit a clone's QEMU (closing a clone leaves it running) and wait until it is gone."""
    assert vm.monitor is not None
    pid = vm.monitor.peer_pid()
    await vm.monitor.quit()
    await vm.close()
    if pid is not None:
        assert await wait_pid_exit(pid, 30.0)


def _kill_leftovers(directory: Path) -> None:
    for sock in directory.glob("*/qmp.sock"):
        with contextlib.suppress(OSError):
            os.kill(peer_pid(sock), signal.SIGKILL)


async def _first_counter(serial: Serial, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while len(serial.counters()) < 2:
        assert time.monotonic() < deadline, "the clone's counter does not run"
        await asyncio.sleep(0.05)
    return serial.counters()[0]


@pytest.mark.guest
@pytest.mark.asyncio
async def test_two_clones_continue_from_the_checkpoint_and_keep_their_writes(
    short_tmp: Path,
) -> None:
    try:
        (disk,) = make_disks(short_tmp, ["vda"])
        config = guest_config(short_tmp, [disk])
        serial = Serial(config.serial_log or "")
        async with await VM.launch(config, state_dir=short_tmp / "state") as source:
            assert source.monitor is not None
            await serial.wait_for(b"qemusnap-guest ready")
            await serial.wait_counter_at_least(3)
            await write_live(source.monitor, "vda", 0x11, offset=AT)
            before = serial.last_counter()
            snap = await source.create("cp", memory_file=str(short_tmp / "cp.mem"))
            at = serial.last_counter()
            frozen = snap.disks[0].file
            assert frozen is not None
            memory = (short_tmp / "cp.mem").read_bytes()
            # The source goes on, on its overlay.
            await write_live(source.monitor, "vda", 0x22, offset=AT)
            # Let the source's counter run well past the checkpoint: a clone's lower value
            # can then only come from the checkpoint's RAM.
            await serial.wait_counter_at_least(at + 4)

            # Two clones at once, from the one checkpoint.
            a, b = await asyncio.gather(
                source.clone("cp", str(short_tmp / "a")), source.clone("cp", str(short_tmp / "b"))
            )
            try:
                assert a.monitor is not None and b.monitor is not None
                for clone, d in ((a, "a"), (b, "b")):
                    assert clone.qmp_socket == str(short_tmp / d / "qmp.sock")
                    assert (await clone.monitor.query_status()).running  # type: ignore[union-attr]
                    first = await _first_counter(Serial(short_tmp / d / "qs-serial.log"))
                    assert before <= first <= at + 1, (before, first, at)
                # The source was not touched and still runs.
                assert (await source.monitor.query_status()).running
                now = serial.last_counter()
                await serial.wait_counter_at_least(now + 1)
                assert serial.last_counter() > at + 4

                # Disk writes stay in each VM: through each guest's own device.
                assert await read_live(a.monitor, "vda", 0x11, offset=AT)
                assert await read_live(b.monitor, "vda", 0x11, offset=AT)
                await write_live(a.monitor, "vda", 0x33, offset=AT)
                await write_live(b.monitor, "vda", 0x44, offset=AT)
                assert await read_live(a.monitor, "vda", 0x33, offset=AT)
                assert await read_live(b.monitor, "vda", 0x44, offset=AT)
                assert await read_live(source.monitor, "vda", 0x22, offset=AT)
                # The frozen image too (read-only, shared by all three).
                assert read_cold(frozen, 0x11, offset=AT)
                assert (short_tmp / "cp.mem").read_bytes() == memory  # never written
                for clone, d in ((a, "a"), (b, "b")):
                    assert clone.record.disks[0].file == str(short_tmp / d / "vda.qcow2")
                    check_clean(short_tmp / d / "vda.qcow2", in_use=True)

                # The snapshot the clones read cannot be deleted; the error names them.
                with pytest.raises(UnsupportedError, match=r"clones (a|b) .*, (a|b) ") as info:
                    await source.delete("cp")
                assert "\n" not in str(info.value)
                assert source.tree().get("cp").memory_file == str(short_tmp / "cp.mem")

                # A clone of a clone: checkpoint clone a, clone that.
                await _stop(b)
                await a.create("a-cp", memory_file=str(short_tmp / "a-cp.mem"))
                a_at = Serial(short_tmp / "a" / "qs-serial.log").last_counter()
                aa = await a.clone("a-cp", str(short_tmp / "aa"))
                try:
                    assert aa.monitor is not None
                    first = await _first_counter(Serial(short_tmp / "aa" / "qs-serial.log"))
                    assert first <= a_at + 1
                    assert await read_live(aa.monitor, "vda", 0x33, offset=AT)
                    await write_live(aa.monitor, "vda", 0x55, offset=AT)
                    assert await read_live(aa.monitor, "vda", 0x55, offset=AT)
                    assert await read_live(a.monitor, "vda", 0x33, offset=AT)
                finally:
                    await _stop(aa)
            finally:
                for clone in (a, b):
                    if clone.monitor is not None:
                        await _stop(clone)
            # Clones gone and their directories removed: the delete goes through.
            images = [i for d in ("a", "b", "aa") for i in (short_tmp / d).glob("*.qcow2")]
            for image in images:
                check_clean(image)
            for image in images:
                image.unlink()
            assert await source.delete("cp") == ["cp"]
            check_clean(disk, in_use=True)
    finally:
        _kill_leftovers(short_tmp)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.mark.parametrize("live", [(), ("--live",)], ids=["checkpoint", "live-checkpoint"])
@pytest.mark.asyncio
async def test_cli_clone_of_a_foreign_vm_and_its_network(
    short_tmp: Path, live: tuple[str, ...]
) -> None:
    """``qemusnap clone NAME --to DIR --json`` on a QEMU someone else started, from an
    external checkpoint or a live one: a hostfwd port is refused in one line, mapped it works;
    the clone answers on DIR/qmp.sock."""
    (disk,) = make_disks(short_tmp, ["vda"])
    port = _free_port()  # a fixed port would collide with a parallel run of this test
    config = firmware_config(
        [disk],
        qmp_socket=str(short_tmp / "src.sock"),
        serial_log=str(short_tmp / "serial.log"),
        extra_args=("-netdev", "user,id=n0,hostfwd=tcp:127.0.0.1:0-:22",
                    "-netdev", f"user,id=n1,hostfwd=tcp:127.0.0.1:{port}-:22",
                    "-device", "virtio-net-pci,netdev=n0", "-device", "virtio-net-pci,netdev=n1"),
    )  # fmt: skip
    state = short_tmp / "state"
    try:
        with ForeignVM(config, short_tmp / "qemu.log") as source:
            cli("--qmp", source.qmp, "create", "cp", "--memory-file", short_tmp / "cp.mem",
                *live, state=state)  # fmt: skip
            refused = cli("--qmp", source.qmp, "clone", "cp", "--to", short_tmp / "c",
                          state=state, expect=2)  # fmt: skip
            assert f"hostfwd=tcp:127.0.0.1:{port}-:22" in refused.stderr
            assert "--net n1=" in refused.stderr
            assert not (short_tmp / "c").exists()
            # A mapping QEMU rejects: the clone's QEMU exits at start; everything made for the
            # clone is rolled back on the spot (its directory, the source's record of it).
            failed = cli("--qmp", source.qmp, "clone", "cp", "--to", short_tmp / "c",
                         "--net", "n1=no-such-backend,id=n1", state=state, expect=1)  # fmt: skip
            assert "QEMU exited" in failed.stderr
            assert not (short_tmp / "c").exists()
            assert not list(state.glob("vms/*/clones/*.json"))
            out = cli_json("--qmp", source.qmp, "clone", "cp", "--to", short_tmp / "c",
                           "--net", "n1=user,id=n1", state=state)  # fmt: skip
            assert out == {
                "name": "c",
                "qmp_socket": str(short_tmp / "c" / "qmp.sock"),
                "state_dir": str(short_tmp / "c" / "state"),
                "pid": peer_pid(short_tmp / "c" / "qmp.sock"),
                "disks": [{"name": "vda", "file": str(short_tmp / "c" / "vda.qcow2")}],
            }
            assert await asyncio.to_thread(source.running)  # untouched
            clone_status = await _status(out["qmp_socket"])
            assert clone_status == "running"
            cmdline = Path(f"/proc/{out['pid']}/cmdline").read_bytes().split(b"\0")
            assert b"user,id=n1" in cmdline and b"hostfwd=tcp:127.0.0.1:0-:22" in b" ".join(cmdline)
            assert not any(str(short_tmp / "serial.log").encode() in a for a in cmdline)
            # The clone is a VM of its own: its state directory knows it.
            with Store(out["state_dir"]) as store:
                assert [d.file for d in store.sole_vm().disks] == [out["disks"][0]["file"]]
            # Deleting the checkpoint is refused while the clone runs, naming it.
            refused = cli("--qmp", source.qmp, "delete", "cp", state=state, expect=2)
            assert "clone c (" in refused.stderr
            os.kill(out["pid"], signal.SIGKILL)
            wait_until(lambda: not pid_alive(out["pid"]), "the clone to die")
            os.unlink(out["disks"][0]["file"])
            cli("--qmp", source.qmp, "delete", "cp", state=state)
    finally:
        _kill_leftovers(short_tmp)


async def _status(sock: str) -> str:
    async with await Monitor.connect(sock) as monitor:
        return (await monitor.query_status()).status


def _qemus_naming(text: str) -> list[int]:
    """Pids of the QEMU processes whose command line contains ``text``."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if text.encode() in cmdline.read_bytes() and pid_alive(int(cmdline.parent.name)):
                pids.append(int(cmdline.parent.name))
    return pids


@pytest.mark.parametrize("step", ["journaled", "overlays-made", "started"])
def test_interrupted_clone_is_rolled_back(short_tmp: Path, step: str) -> None:
    """A clone killed half-way (``kill -9`` at each step) is rolled back by the next command on
    its state directory: no QEMU left, no overlay, and the source no longer counts it."""
    (disk,) = make_disks(short_tmp, ["vda"])
    config = firmware_config([disk], qmp_socket=str(short_tmp / "src.sock"))
    state = short_tmp / "state"
    target = short_tmp / "c"
    try:
        with ForeignVM(config, short_tmp / "qemu.log") as source:
            cli("--qmp", source.qmp, "create", "cp", "--memory-file", short_tmp / "cp.mem",
                state=state)  # fmt: skip
            done = subprocess.run(
                [*QEMUSNAP, "--state", str(state), "--qmp", str(source.qmp), "clone", "cp",
                 "--to", str(target)],
                env={**os.environ, "QEMUSNAP_CRASH_AT": f"clone:{step}"},
                capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert done.returncode == -signal.SIGKILL, done.stderr
            if step != "journaled":
                assert list(target.glob("*.qcow2"))  # the crash left the overlay
            if step == "started":
                assert _qemus_naming(str(target / "qmp.sock"))  # and the clone's QEMU running
            cli("recover", state=target / "state")
            assert _qemus_naming(str(target / "qmp.sock")) == []
            assert list(target.glob("*.qcow2")) == []
            assert not (target / "qmp.sock").exists()
            # The source was never touched and its checkpoint can go.
            assert source.running()
            cli("--qmp", source.qmp, "delete", "cp", state=state)
            check_clean(disk, in_use=True)
    finally:
        for pid in _qemus_naming(str(target)):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.asyncio
async def test_a_clone_whose_state_cannot_be_recorded_leaves_nothing(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clone's own state directory fails before anything is made: the source's record of
    the clone goes again (else its checkpoint could never be deleted), and the target
    directory with it."""
    (disk,) = make_disks(short_tmp, ["vda"])
    config = firmware_config([disk], qmp_socket=str(short_tmp / "src.sock"))
    state = short_tmp / "state"
    target = short_tmp / "c"
    with ForeignVM(config, short_tmp / "qemu.log") as source:
        cli("--qmp", source.qmp, "create", "cp", "--memory-file", short_tmp / "cp.mem",
            state=state)  # fmt: skip

        def refuse(*args: object, **kwargs: object) -> None:
            raise StoreError("state database error: disk I/O error")

        monkeypatch.setattr(Store, "add_vm", refuse)
        vm = await VM.attach(str(source.qmp), state_dir=state)
        async with vm:
            with pytest.raises(StoreError):
                await vm.clone("cp", str(target))
        monkeypatch.undo()
        assert not target.exists()
        cli("--qmp", source.qmp, "delete", "cp", state=state)  # no clone is said to read it
        check_clean(disk, in_use=True)
