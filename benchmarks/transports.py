"""Memory-file transports compared like with like, and the quiesce freeze window.

Each memory-file write is timed from the start of the save until QEMU's file is complete *and*
``fsync``'ed (``Saver.run`` syncs the descriptor), the same way ``dd conv=fsync`` is timed; the
throughput is the data written (allocated blocks: a mapped-ram file has holes where RAM pages
are zero) over that time.  Which transports run depends on what the QEMU offers
(:mod:`qemusnap.capabilities`): the ``fd:`` stream (up to 10.x; 11 refuses it for files), the
``file:`` stream (8.2+) and ``mapped-ram`` with multifd (9.0+).

A load is timed in a second QEMU of the same configuration started with ``-incoming defer``
(images stay inactive: ``late-block-activate``, so it does not fight the running one for them),
from ``migrate-incoming`` until ``completed``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import attrs

from qemusnap import agent as agent_mod
from qemusnap.capabilities import Capabilities, MemoryMechanism, Transport
from qemusnap.machine import Machine
from qemusnap.memory import MemoryFiles
from qemusnap.models import MemoryFormat
from qemusnap.monitor import Monitor

from .guest import BenchError
from .measure import MIB, Sample, Target, ms_since

#: (row key suffix, label): the variants in table order.
VARIANTS = (
    ("fd", "`fd:` stream (getfd)"),
    ("file", "`file:` stream (add-fd)"),
    ("mapped_ram", "`file:` + mapped-ram + multifd"),
)


def mechanisms(caps: Capabilities, channels: int) -> dict[str, MemoryMechanism | str]:
    """The mechanism of each variant on this QEMU, or why it is not available."""
    out: dict[str, MemoryMechanism | str] = {}
    fd = caps.save_mechanism(live=False, mapped_ram=False)
    fd = attrs.evolve(fd, transport=Transport.FD, use_channels=False)
    out["fd"] = (
        "QEMU 11 refuses fd: migration to a regular file"
        if caps.version >= (11, 0, 0)  # observed behaviour, not a capability in the schema
        else fd
    )
    out["file"] = (
        caps.save_mechanism(live=False, mapped_ram=False)
        if caps.file_uri
        else "no file: migration URI in this QEMU"
    )
    out["mapped_ram"] = (
        caps.save_mechanism(live=False, mapped_ram=True, channels=channels)
        if caps.mapped_ram
        else "no mapped-ram migration capability in this QEMU"
    )
    return out


async def memory_write(target: Target, path: Path, mechanism: MemoryMechanism) -> Sample:
    """Stop the guest, write its memory state to ``path`` with ``mechanism``, sync, resume."""
    monitor = target.monitor
    files = MemoryFiles()
    path.parent.mkdir(mode=0o700, exist_ok=True)
    await monitor.stop()
    try:
        start = time.perf_counter()
        async with files.saving(monitor, str(path), live=False, mechanism=mechanism) as saver:
            await saver.run(timeout=1800)
        wall = ms_since(start)
    finally:
        await monitor.wait_status_not("finish-migrate", timeout=30.0)
        await monitor.cont()
    stat = path.stat()
    written = stat.st_blocks * 512
    return Sample(
        wall,
        extra={
            "mib_s": round(written / MIB / (wall / 1000), 1),
            "written_mib": round(written / MIB, 1),
            "file_mib": round(stat.st_size / MIB, 1),
            "format": str(mechanism.format),
        },
    )


async def memory_load(target: Target, path: Path, fmt: MemoryFormat) -> Sample:
    """Load ``path`` into a second QEMU waiting with ``-incoming defer``; time the load."""
    machine_now = target.vm.machine
    if machine_now is None:
        raise BenchError("the benchmark VM has no Machine config")
    config = attrs.evolve(
        machine_now.config,
        qga_socket=str(target.directory / "qga-load.sock"),
        serial_log=str(target.directory / "serial-load.log"),
        qmp_socket=None,
    )
    async with Machine(config, paused=True, incoming=True) as machine:
        monitor = machine.monitor
        # Keep the images inactive after the load: the running QEMU holds their locks.
        await monitor.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": "late-block-activate", "state": True}]},
        )
        start = time.perf_counter()
        await MemoryFiles().load(monitor, str(path), timeout=1800, fmt=fmt)
        wall = ms_since(start)
    return Sample(
        wall, extra={"mib_s": round(path.stat().st_blocks * 512 / MIB / (wall / 1000), 1)}
    )


async def quiesced_disk_only(target: Target, name: str) -> Sample:
    """A quiesced external disk-only snapshot of every disk: the freeze window is the time
    from the reply to ``guest-fsfreeze-freeze`` (filesystems frozen) to the reply to
    ``guest-fsfreeze-thaw``, on the host's clock (what the guest's applications see blocked,
    less the two agent round trips' halves)."""
    stamps: dict[str, float] = {}
    agent_execute = agent_mod.GuestAgent.execute
    qmp_execute = Monitor.execute

    async def agent_recording(
        self: agent_mod.GuestAgent, command: str, *args: Any, **kw: Any
    ) -> Any:
        stamps[f"{command} sent"] = time.perf_counter()
        result = await agent_execute(self, command, *args, **kw)
        stamps[command] = time.perf_counter()
        return result

    async def qmp_recording(self: Monitor, command: str, *args: Any, **kw: Any) -> Any:
        stamps[f"{command} sent"] = time.perf_counter()
        result = await qmp_execute(self, command, *args, **kw)
        stamps[command] = time.perf_counter()
        return result

    agent_mod.GuestAgent.execute = agent_recording  # type: ignore[method-assign]
    Monitor.execute = qmp_recording  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        await target.vm.create(name, disk_only=True, quiesce=True)
        wall = ms_since(start)
    finally:
        agent_mod.GuestAgent.execute = agent_execute  # type: ignore[method-assign]
        Monitor.execute = qmp_execute  # type: ignore[method-assign]
    if "guest-fsfreeze-freeze" not in stamps or "guest-fsfreeze-thaw" not in stamps:
        raise BenchError(f"the snapshot did not freeze and thaw the guest: {sorted(stamps)}")

    def span(first: str, last: str) -> float:
        return round((stamps[last] - stamps[first]) * 1000, 2)

    return Sample(
        wall,
        extra={
            "freeze_ms": span("guest-fsfreeze-freeze", "guest-fsfreeze-thaw"),
            # Its parts: the disk cut (QMP transaction), the thaw's round trip.
            "transaction_ms": span("transaction sent", "transaction"),
            "thaw_ms": span("guest-fsfreeze-thaw sent", "guest-fsfreeze-thaw"),
            "freeze_call_ms": span("guest-fsfreeze-freeze sent", "guest-fsfreeze-freeze"),
        },
    )


def remove(path: Path) -> None:
    if path.exists():
        os.unlink(path)
