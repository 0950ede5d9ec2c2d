"""What is measured, one function per operation, against one booted guest (a :class:`Target`).

Every function takes one repetition and returns a :class:`Sample`. A guest pause is the time
between QEMU's ``STOP`` and ``RESUME`` events, from the timestamps QEMU puts on them (its own
clock, microseconds), so the latency of our QMP connection is not part of it.

Operations the engine does not have yet raise ``UnsupportedError`` ("not built yet"): the
runner records them as "n/a", and they start being measured as soon as the engine has them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemusnap import VM, VMState
from qemusnap.monitor import EventWaiter, Monitor

from .guest import BenchError, Serial, wait_agent

MIB = 1024 * 1024
#: How long the guest may take to resume after a job ended with it paused (RESUME pending).
RESUME_TIMEOUT = 30.0


@dataclass
class Sample:
    wall_ms: float
    pause_ms: float | None = None  # None: not measurable (QEMU was replaced)
    extra: dict[str, Any] = field(default_factory=dict)  # mib_s, running_ms, agent_ms, ...


@dataclass
class Target:
    """The booted guest the measurements run against."""

    vm: VM
    serial: Serial
    qga_socket: str
    directory: Path  # scratch space of this guest: memory files, dd files
    disks: tuple[str, ...]  # disk names, the first holds internal vmstate
    #: The guest counter just before each checkpoint was taken (by snapshot name).
    counter_at: dict[str, int] = field(default_factory=dict)

    @property
    def monitor(self) -> Monitor:
        if self.vm.monitor is None:
            raise BenchError("the VM is not running")
        return self.vm.monitor


def ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def _timestamp(event: dict[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


async def _pause_ms(events: EventWaiter) -> float:
    """Total STOP -> RESUME time of the events received so far (0 if the guest never stopped)."""
    received = events.drain()
    if received and received[-1]["event"] == "STOP":
        # Still paused: a background snapshot resumes the guest itself, shortly after.
        received.append(await events.wait("RESUME", timeout=RESUME_TIMEOUT))
    total, stopped_at = 0.0, None
    for event in received:
        if event["event"] == "STOP":
            stopped_at = _timestamp(event)
        elif stopped_at is not None:  # a RESUME ending a pause we saw begin
            total += _timestamp(event) - stopped_at
            stopped_at = None
    return round(total * 1000, 2)


async def timed(target: Target, action: Callable[[], Awaitable[object]]) -> Sample:
    """Run ``action``: its wall time, and how long the guest was paused meanwhile."""
    monitor = target.monitor
    # Listen before the command: QEMU may send STOP before its reply to it.
    async with monitor.listen("STOP", "RESUME") as events:
        start = time.perf_counter()
        await action()
        wall = ms_since(start)
        if target.vm.monitor is not monitor:  # QEMU was restarted: its events went with it
            return Sample(wall)
        return Sample(wall, await _pause_ms(events))


async def _guest_ticks(target: Target) -> int:
    """Wait for the next counter line (at most ~1 s): the guest runs; returns its value."""
    return await target.serial.wait_counter_at_least(target.serial.last_counter() + 1)


# --- internal ---------------------------------------------------------------------------------


async def internal_checkpoint(target: Target, name: str) -> Sample:
    """``vm.create(name)``: the QMP ``snapshot-save`` job, RAM written into the first disk."""
    target.counter_at[name] = await _guest_ticks(target)
    sample = await timed(target, lambda: target.vm.create(name))
    # The vmstate size from the image's snapshot table: the bytes the pause was spent on.
    (chain,) = await target.vm.chains(target.disks[0])
    size = next(s.vm_state_size for s in chain.active.snapshots if s.name == name)
    sample.extra["vmstate_mib"] = round(size / MIB, 1)
    sample.extra["mib_s"] = round(size / MIB / (sample.wall_ms / 1000), 1)
    return sample


async def disk_only(target: Target, name: str, *, disks: int, internal: bool) -> Sample:
    """A disk-only snapshot of the first ``disks`` disks (the others excluded): internal is a
    ``transaction`` of ``blockdev-snapshot-internal-sync``, external one of overlays."""
    exclude = target.disks[disks:]
    if internal:
        return await timed(
            target,
            lambda: target.vm.create(name, disk_only=True, internal=True, exclude=exclude),
        )
    return await timed(target, lambda: target.vm.create(name, disk_only=True, exclude=exclude))


async def revert(target: Target, name: str) -> Sample:
    """``vm.revert(name)`` of a checkpoint: wall time until the guest runs (query-status), until
    its agent answers ``guest-ping``, and until its counter continues from the snapshot."""
    at = target.counter_at[name]
    # Let the guest move well past the snapshot, so that the counter values it prints after the
    # revert (at + 1 or at + 2) cannot be confused with the ones before it.
    await target.serial.wait_counter_at_least(at + 5)
    target.serial.mark()
    monitor = target.monitor
    async with monitor.listen("STOP", "RESUME") as events:
        start = time.perf_counter()
        await target.vm.revert(name)
        # All three at once: each notes when it first succeeded.
        running, agent, counter = await asyncio.gather(
            _wait_running(target),
            wait_agent(target.qga_socket),
            target.serial.wait_restored(at + 2),
        )
        pause = await _pause_ms(events) if target.vm.monitor is monitor else None
    running_ms = round((running - start) * 1000, 2)
    return Sample(
        wall_ms=running_ms,
        pause_ms=pause,
        extra={
            "running_ms": running_ms,
            "agent_ms": round((agent - start) * 1000, 2),
            "counter_ms": round((counter - start) * 1000, 2),
        },
    )


async def _wait_running(target: Target, timeout: float = 60.0) -> float:
    deadline = time.monotonic() + timeout
    while await target.vm.run_state() is not VMState.RUNNING:
        if time.monotonic() > deadline:
            raise BenchError(f"the guest was not running {timeout:g} s after the revert")
        await asyncio.sleep(0.005)
    return time.perf_counter()


# --- HOOK: external checkpoints' memory-file throughput ------------------------------------------


async def external_checkpoint(target: Target, name: str, *, live: bool) -> Sample:
    """HOOK: the memory-file write throughput of an external checkpoint.

    ``vm.create(name, memory_file=PATH)`` (stop, disk transaction, migrate to the file, cont) and
    with ``live=True`` (background-snapshot: the guest runs while its RAM as of the pause is
    written). Until the engine has them they raise UnsupportedError and the table says n/a.
    Throughput is the memory file's size over the call's wall time (for ``live`` the call
    returns when the whole file is written).
    """
    path = target.directory / "memory" / f"{name}.mem"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    target.counter_at[name] = await _guest_ticks(target)
    sample = await timed(target, lambda: target.vm.create(name, memory_file=str(path), live=live))
    size = os.path.getsize(path)
    sample.extra["file_mib"] = round(size / MIB, 1)
    sample.extra["wall_mib_s"] = round(size / MIB / (sample.wall_ms / 1000), 1)
    # The RAM write itself, as QEMU timed it (query-migrate still describes the finished
    # migration): without the overlay preparation and QMP round trips around it.
    migrated = await target.monitor.query_migrate()
    total_ms = float(migrated.get("total-time") or sample.wall_ms)
    sample.extra["mib_s"] = round(size / MIB / (total_ms / 1000), 1)
    return sample


# --- the reference: dd ------------------------------------------------------------------------


def write_random_source(path: Path, size_mib: int) -> None:
    """A file of ``size_mib`` copies of one random 1 MiB block, synced to disk.

    Random so that no layer below can skip or compress zeros; repeated blocks, like the guest's
    RAM fill, so dd writes the same kind of data as the memory snapshots. Synced so that its own
    writeback does not compete with the timed dd.
    """
    block = os.urandom(MIB)
    with open(path, "wb") as out:
        for _ in range(size_mib):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())


async def dd_write(directory: Path, size_mib: int) -> Sample:
    """``dd bs=1M conv=fsync`` of ``size_mib`` MiB into the scratch directory (the filesystem the
    images and memory files live on): the throughput a memory file could reach at best."""
    source, target = directory / "dd-source.bin", directory / "dd.bin"
    await asyncio.to_thread(write_random_source, source, size_mib)
    try:
        start = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            "dd",
            f"if={source}",
            f"of={target}",
            "bs=1M",
            f"count={size_mib}",
            "conv=fsync",
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await process.communicate()
        wall = ms_since(start)
        if process.returncode != 0:
            raise BenchError(f"dd failed: {stderr.decode(errors='replace').strip()}")
    finally:
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
    return Sample(wall, extra={"mib_s": round(size_mib / (wall / 1000), 1)})
