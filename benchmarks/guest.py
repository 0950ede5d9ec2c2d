"""The test guest, as the benchmark uses it: boot it, fill its RAM, watch its serial console.

The guest (scripts/build-test-guest) prints ``qemusnap-guest ready`` once set up and
``qemusnap-counter N`` every second; the counter lives only in guest RAM, so after a memory
revert it continues from the snapshot's value: the oracle for "the guest runs again, restored".
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qemusnap.agent import GuestAgent
from qemusnap.errors import GuestAgentError, OperationTimeout
from qemusnap.machine import Drive, MachineConfig

ROOT = Path(__file__).resolve().parent.parent
GUEST_DIR = Path(os.environ.get("QEMUSNAP_GUEST_DIR", ROOT / ".cache" / "test-guest"))
BOOT_TIMEOUT = 180.0
COUNTER = re.compile(rb"qemusnap-counter (\d+)")

#: The fill must reach this share of guest RAM, or the benchmark refuses to measure.
MIN_FILL_PERCENT = 75.0
#: RAM left free in the guest after the fill: the kernel, qemu-ga and busybox need some, and a
#: guest out of memory would kill qemu-ga (or PID 1) instead of failing the fill cleanly.
HEADROOM_MIB = 32
#: Files copied per guest-exec call: ~128 MiB takes ~2 s under TCG, far below agent timeouts.
FILL_CHUNK = 128

Log = Callable[[str], None]


class BenchError(Exception):
    """The benchmark cannot go on (guest did not boot, fill too small, ...)."""


def guest_config(
    directory: Path, disks: Sequence[Path], *, memory_mib: int, accel: str
) -> MachineConfig:
    for name in ("vmlinuz", "initrd.img"):
        if not (GUEST_DIR / name).exists():
            raise BenchError(f"test guest not built: no {GUEST_DIR / name} (scripts/setup)")
    return MachineConfig(
        drives=tuple(Drive(str(p), p.stem) for p in disks),
        memory_mib=memory_mib,
        accel=accel,
        kernel=str(GUEST_DIR / "vmlinuz"),
        initrd=str(GUEST_DIR / "initrd.img"),
        append="console=ttyS0 quiet panic=-1",
        serial_log=str(directory / "serial.log"),
        qga_socket=str(directory / "qga.sock"),
    )


async def make_disks(directory: Path, names: Sequence[str], size: str = "64M") -> list[Path]:
    paths = []
    for name in names:
        path = directory / f"{name}.qcow2"
        process = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", str(path), size
        )
        if await process.wait() != 0:
            raise BenchError(f"qemu-img create {path} failed")
        paths.append(path)
    return paths


class Serial:
    """Reads the guest's serial log; ``mark()`` remembers where "new output" starts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._offset = 0

    def text(self) -> bytes:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""

    def mark(self) -> None:
        self._offset = len(self.text())

    def _new(self) -> bytes:
        text = self.text()
        # A restarted QEMU truncates its -serial file: then everything in it is new.
        return text[self._offset :] if len(text) >= self._offset else text

    def last_counter(self) -> int:
        values = COUNTER.findall(self.text())
        return int(values[-1]) if values else -1

    async def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while b"qemusnap-guest ready" not in self._new():
            if time.monotonic() > deadline:
                tail = self.text()[-1500:].decode(errors="replace")
                raise BenchError(f"the guest did not boot within {timeout:g} s:\n{tail}")
            await asyncio.sleep(0.1)

    async def wait_counter_at_least(self, value: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while (last := self.last_counter()) < value:
            if time.monotonic() > deadline:
                raise BenchError(f"the guest counter did not reach {value} (at {last})")
            await asyncio.sleep(0.05)
        return last

    async def wait_restored(self, at_most: int, timeout: float = 60.0) -> float:
        """Wait for a counter line, printed since the mark, with a value <= ``at_most``: the
        guest runs again from the snapshot. Returns when it was seen (``time.perf_counter``)."""
        deadline = time.monotonic() + timeout
        while True:
            if any(int(n) <= at_most for n in COUNTER.findall(self._new())):
                return time.perf_counter()
            if time.monotonic() > deadline:
                seen = [int(n) for n in COUNTER.findall(self._new())]
                raise BenchError(f"the counter did not continue from <= {at_most}: saw {seen}")
            await asyncio.sleep(0.01)


async def wait_agent(qga_socket: str, timeout: float = 60.0) -> float:
    """Wait until the guest agent answers ``guest-ping`` on a fresh connection; return when
    (``time.perf_counter``). A fresh connection per try: it resynchronises the stream."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with GuestAgent(qga_socket, timeout=1.0) as agent:
                await agent.ping(timeout=1.0)
            return time.perf_counter()
        except (GuestAgentError, OperationTimeout) as exc:
            if time.monotonic() > deadline:
                raise BenchError(f"the guest agent did not answer within {timeout:g} s") from exc
            await asyncio.sleep(0.02)


# --- filling guest RAM ---------------------------------------------------------------------


@dataclass(frozen=True)
class MemInfo:
    total_mib: float
    available_mib: float
    shmem_mib: float  # tmpfs (our fill, /tmp) and the initramfs rootfs


@dataclass(frozen=True)
class Fill:
    ram_mib: int
    written_mib: int  # copies of the random 1 MiB block in /mnt/fill
    shmem_mib: float  # all tmpfs data in the guest after the fill (what is verified)
    percent: float  # shmem_mib / ram_mib
    mem_total_mib: float  # what the guest kernel sees (RAM minus its reservations)
    available_after_mib: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def _sh(agent: GuestAgent, script: str, timeout: float = 120.0) -> str:
    result = await agent.exec("/bin/sh", ["-c", script], timeout=timeout)
    if result.exitcode != 0:
        raise BenchError(f"guest command failed ({result.exitcode}): {script}\n{result.stderr!r}")
    return result.stdout.decode()


async def meminfo(agent: GuestAgent) -> MemInfo:
    fields: dict[str, float] = {}
    for line in (await _sh(agent, "cat /proc/meminfo")).splitlines():
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0]) / 1024
    return MemInfo(fields["MemTotal"], fields["MemAvailable"], fields["Shmem"])


async def fill_ram(qga_socket: str, ram_mib: int, target_percent: float, log: Log) -> Fill:
    """Fill guest RAM with non-zero data: copies of one random 1 MiB block in a tmpfs.

    Zero pages cost nothing in a migration stream, so an empty guest would make every memory
    snapshot look fast. Copying a block per file runs at ~70-150 MiB/s under TCG (byte-at-a-time
    tools are ~20x slower). The copies are identical, but no QEMU transport used here
    deduplicates pages (no xbzrle, no compression): each page is written out in full.
    """
    started = time.perf_counter()
    async with GuestAgent(qga_socket, timeout=30.0) as agent:
        before = await meminfo(agent)
        wanted = math.ceil(ram_mib * target_percent / 100 - before.shmem_mib) - 1  # 1: the block
        room = math.floor(before.available_mib - HEADROOM_MIB) - 1
        count = min(wanted, room)
        log(
            f"guest sees {before.total_mib:.0f} MiB, {before.available_mib:.0f} available,"
            f" {before.shmem_mib:.0f} in tmpfs; writing {count} MiB of non-zero data"
        )
        await _sh(
            agent,
            f"set -e; mkdir -p /mnt/fill; mount -t tmpfs -o size={count + 8}m tmpfs /mnt/fill;"
            " dd if=/dev/urandom of=/tmp/block bs=1M count=1 2>/dev/null",
        )
        for first in range(1, count + 1, FILL_CHUNK):
            last = min(first + FILL_CHUNK - 1, count)
            await _sh(
                agent,
                f"i={first}; while [ $i -le {last} ]; do"
                " cat /tmp/block > /mnt/fill/f$i || exit 1; i=$((i + 1)); done",
            )
            log(f"filled {last}/{count} MiB")
        after = await meminfo(agent)
    fill = Fill(
        ram_mib=ram_mib,
        written_mib=count,
        shmem_mib=round(after.shmem_mib, 1),
        percent=round(100 * after.shmem_mib / ram_mib, 1),
        mem_total_mib=round(after.total_mib, 1),
        available_after_mib=round(after.available_mib, 1),
        seconds=round(time.perf_counter() - started, 1),
    )
    if fill.percent < MIN_FILL_PERCENT:
        raise BenchError(
            f"guest RAM fill reached only {fill.percent} % of {ram_mib} MiB"
            f" (needed {MIN_FILL_PERCENT} %): {fill}"
        )
    return fill
