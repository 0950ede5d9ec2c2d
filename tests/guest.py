"""Booting the bundled test guest (scripts/build-test-guest) for memory-state and agent tests.

The guest prints ``qemusnap-guest ready`` once set up and ``qemusnap-counter N`` every second;
the counter lives only in guest RAM, so it is the oracle for "memory state was restored".
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Sequence
from pathlib import Path

from conftest import GUEST_DIR

from qemusnap.machine import Drive, MachineConfig

COUNTER = re.compile(rb"qemusnap-counter (\d+)")
BOOT_TIMEOUT = 120.0


def guest_config(directory: Path, disks: Sequence[Path], *, memory_mib: int = 256) -> MachineConfig:
    return MachineConfig(
        drives=tuple(Drive(str(p), p.stem) for p in disks),
        memory_mib=memory_mib,
        accel="auto",
        kernel=str(GUEST_DIR / "vmlinuz"),
        initrd=str(GUEST_DIR / "initrd.img"),
        append="console=ttyS0 quiet panic=-1",
        serial_log=str(directory / "serial.log"),
        qga_socket=str(directory / "qga.sock"),
    )


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

    def counters(self) -> list[int]:
        """Counter values printed since the last mark."""
        text = self.text()
        if len(text) < self._offset:  # a restarted QEMU truncated the log
            self._offset = 0
        return [int(n) for n in COUNTER.findall(text[self._offset :])]

    async def wait_for(self, needle: bytes, timeout: float = BOOT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text()[self._offset :]:
            if time.monotonic() > deadline:
                tail = self.text()[-2000:].decode(errors="replace")
                raise AssertionError(f"guest never printed {needle!r}; serial tail:\n{tail}")
            await asyncio.sleep(0.1)

    async def next_counter(self, timeout: float = 30.0) -> int:
        """The counter value the guest continued with after a revert since the last mark.

        The old guest may still print a line or two between the mark and the revert: the
        revert shows as the point where the counter goes back, if it does.
        """
        deadline = time.monotonic() + timeout
        while len(self.counters()) < 2:
            if time.monotonic() > deadline:
                raise AssertionError("the guest counter did not advance")
            await asyncio.sleep(0.05)
        values = self.counters()
        for before, after in itertools.pairwise(values):
            if after <= before:
                return after
        return values[0]

    async def wait_counter_at_least(self, value: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            values = COUNTER.findall(self.text())
            if values and int(values[-1]) >= value:
                return int(values[-1])
            if time.monotonic() > deadline:
                raise AssertionError(f"the guest counter did not reach {value}")
            await asyncio.sleep(0.1)

    def last_counter(self) -> int:
        values = COUNTER.findall(self.text())
        return int(values[-1]) if values else -1
