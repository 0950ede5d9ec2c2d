"""The Monitor against a real QEMU (firmware only, TCG, paused before the first instruction).

QMP goes over a socketpair passed to QEMU as ``-chardev socket,fd=N``: no socket file to race.
"""

from __future__ import annotations

import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from qemusnap.errors import CommandError, JobError, MonitorError
from qemusnap.monitor import Monitor, RunStatus


def start_qemu(image: Path, qmp_fd: int, stdout: Path) -> subprocess.Popen[bytes]:
    argv = [
        "qemu-system-x86_64",
        "-accel", "tcg", "-M", "q35", "-m", "128", "-nodefaults", "-display", "none", "-S",
        "-chardev", f"socket,id=mon,fd={qmp_fd}", "-mon", "chardev=mon,mode=control",
        "-blockdev",
        f"driver=qcow2,node-name=vda-fmt,file.driver=file,file.filename={image}",
        "-device", "virtio-blk-pci,drive=vda-fmt,id=vda",
    ]  # fmt: skip
    with stdout.open("wb") as out:
        # qemu-io run through HMP prints its results on QEMU's stdout: keep it for the checks.
        return subprocess.Popen(
            argv, pass_fds=[qmp_fd], stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )


@pytest.mark.asyncio
@pytest.mark.qemu_system
@pytest.mark.qemu_img
async def test_real_qemu(short_tmp: Path) -> None:
    image = short_tmp / "vda.qcow2"
    overlay = short_tmp / "vda-ov.qcow2"
    log = short_tmp / "qemu.out"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    ours, theirs = socket.socketpair()
    with theirs:
        qemu = start_qemu(image, theirs.fileno(), log)

    try:
        async with await Monitor.connect(ours, name="real") as mon:
            assert mon.qemu_version is not None and mon.qemu_version >= (7, 0, 0)
            assert await mon.query_status() == RunStatus("prelaunch", False)

            (disk,) = await mon.disks()
            assert (disk.name, disk.file, disk.format) == ("vda", str(image), "qcow2")
            assert disk.node_name == "vda-fmt" and not disk.read_only
            assert disk.device == "/machine/peripheral/vda/virtio-backend"

            # the device id is resolved to the virtio backend; the reply is empty on success
            assert await mon.qemu_io("vda", "write -P 0x5a 0 64k") == ""
            with pytest.raises(MonitorError, match="nosuch"):
                await mon.qemu_io("nosuch", "write -P 0x5a 0 64k")

            async with mon.listen("RESUME", "STOP") as events:
                await mon.cont()
                await events.wait("RESUME", timeout=5)
                assert (await mon.query_status()).running
                await mon.stop()
                await events.wait("STOP", timeout=5)
            assert await mon.query_status() == RunStatus("paused", False)

            # internal snapshot job; a second one with the same tag concludes with an error
            args = {"tag": "s1", "vmstate": "vda-fmt", "devices": ["vda-fmt"]}
            await mon.run_job("snapshot-save", args, job_id="save-1", timeout=30)
            with pytest.raises(JobError, match="already exists"):
                await mon.run_job("snapshot-save", args, job_id="save-2", timeout=30)
            assert await mon.execute("query-jobs") == []  # both dismissed

            # external overlay, then an active commit back into the base (READY -> pivot)
            await mon.execute(
                "blockdev-snapshot-sync",
                {
                    "node-name": "vda-fmt",
                    "snapshot-file": str(overlay),
                    "snapshot-node-name": "vda-ov",
                    "format": "qcow2",
                },
            )
            assert (await mon.disks())[0].file == str(overlay)
            await mon.qemu_io("vda", "write -P 0x6b 0 64k")
            progress: list[tuple[int, int]] = []
            await mon.run_block_job(
                "block-commit",
                {"device": "vda-ov"},
                job_id="commit-1",
                timeout=30,
                progress=lambda done, total: progress.append((done, total)),
            )
            assert (await mon.disks())[0].file == str(image)
            assert progress and progress[-1][0] == progress[-1][1]
            with pytest.raises(CommandError):
                await mon.execute("block-job-complete", {"device": "commit-1"})

            with tempfile.TemporaryFile() as memory:
                await mon.send_fd(memory.fileno(), "mem")
                await mon.close_fd("mem")
            with pytest.raises(CommandError, match="not found"):
                await mon.close_fd("mem")

            await mon.quit()
            assert not mon.connected
        assert qemu.wait(timeout=15) == 0
    finally:
        ours.close()
        if qemu.poll() is None:
            qemu.kill()
            qemu.wait()

    output = log.read_text(errors="replace")
    assert output.count("wrote 65536/65536 bytes at offset 0") == 2, output
    check = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x6b 0 64k", str(image)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0 and "verification failed" not in check.stdout, check.stdout
