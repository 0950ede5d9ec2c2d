"""Helpers for tests against a live QEMU: write byte patterns through a guest device with HMP
``qemu-io`` and read them back independently over a read-only NBD export (the HMP reply of
``qemu-io`` is empty even when it fails, so it cannot be the oracle; QEMU-NOTES.md).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from qemusnap.machine import Drive, MachineConfig
from qemusnap.monitor import Monitor

MIB = 1024 * 1024
LENGTH = MIB  # every pattern covers the first MiB of a disk
_export_ids = itertools.count()


def make_disks(directory: Path, names: Sequence[str], size: str = "64M") -> list[Path]:
    paths = []
    for name in names:
        path = directory / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
        paths.append(path)
    return paths


def firmware_config(disks: Sequence[Path], **kwargs: object) -> MachineConfig:
    """A firmware-only TCG VM (no guest OS): enough for block-level live tests."""
    drives = tuple(Drive(str(p), p.stem) for p in disks)
    return MachineConfig(drives=drives, accel="tcg", memory_mib=128, **kwargs)  # type: ignore[arg-type]


async def write_live(monitor: Monitor, device: str, pattern: int, *, offset: int = 0) -> None:
    """Write ``pattern`` over the first MiB (from ``offset``) through the guest device's own
    block backend."""
    await monitor.qemu_io(
        f"/machine/peripheral/{device}/virtio-backend",
        f"write -P 0x{pattern:02x} {offset} {LENGTH}",
    )


async def read_live(monitor: Monitor, device: str, pattern: int, *, offset: int = 0) -> bool:
    """Whether the device's current content starts with a MiB of ``pattern`` (from
    ``offset``; via NBD)."""
    node = next(d.node_name for d in await monitor.disks() if d.name == device)
    sock_dir = tempfile.mkdtemp(prefix="qs-nbd-", dir="/tmp")
    sock = os.path.join(sock_dir, "nbd.sock")
    export = f"e{next(_export_ids)}"
    await monitor.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}})
    try:
        await monitor.execute(
            "block-export-add",
            {"type": "nbd", "id": export, "node-name": node, "name": export, "writable": False},
        )
        done = subprocess.run(
            [
                "qemu-io",
                "-r",
                "-f",
                "raw",
                f"nbd+unix:///{export}?socket={sock}",
                "-c",
                f"read -P 0x{pattern:02x} {offset} {LENGTH}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # "hard": qemu-io has exited, but QEMU may not have noticed its disconnect yet.
        await monitor.execute("block-export-del", {"id": export, "mode": "hard"})
    finally:
        await monitor.execute("nbd-server-stop")
        os.rmdir(sock_dir) if not os.listdir(sock_dir) else None
    if "Pattern verification failed" in done.stdout:
        return False
    assert done.returncode == 0 and f"read {LENGTH}/{LENGTH} bytes" in done.stdout, (
        done.stdout + done.stderr
    )
    return True


async def flush_live(monitor: Monitor) -> None:
    """Make QEMU write its cached qcow2 metadata, so a ``check -U`` of the file sees it all."""
    for disk in await monitor.disks():
        if disk.device:
            await monitor.qemu_io(disk.device, "flush")


def read_cold(image: Path | str, pattern: int, *, offset: int = 0) -> bool:
    command = f"read -P 0x{pattern:02x} {offset} {LENGTH}"
    done = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", command, str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "Pattern verification failed" in done.stdout:
        return False
    assert done.returncode == 0 and f"read {LENGTH}/{LENGTH} bytes" in done.stdout, (
        done.stdout + done.stderr
    )
    return True


def write_cold(image: Path | str, pattern: int) -> None:
    done = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P 0x{pattern:02x} 0 {LENGTH}", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "wrote" in done.stdout, done.stdout + done.stderr


def check_clean(image: Path | str, *, in_use: bool = False) -> None:
    """``qemu-img check`` (read-only; ``-U`` while QEMU holds the image) must report nothing."""
    argv = ["qemu-img", "check", *(["-U"] if in_use else []), str(image)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
