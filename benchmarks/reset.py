"""``scripts/bench --reset``: the harness kit's per-test reset beside a fresh boot.

For each guest RAM size: boot the test guest (one qcow2 disk), take the golden snapshot the way
the pytest plugin does (:func:`qemusnap.harness.golden`), then ``--repeat`` times: change the
guest (a file in RAM, a background process), reset (:func:`qemusnap.harness.reset`) and time it
to "guest running" (the revert returned: QEMU reports running) and to "guest responsive" (a new
guest-agent connection answers ``guest-ping``).  The fresh boot is timed the same way: from
starting QEMU to the agent answering.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qemusnap import VM
from qemusnap.agent import GuestAgent
from qemusnap.harness import golden, reset
from qemusnap.machine import choose_accel

from .guest import guest_config, make_disks, wait_agent
from .report import machine_info

DEFAULT_RAM = (256, 512, 1024)


async def _boot(directory: Path, ram_mib: int, accel: str) -> tuple[VM, float]:
    """Launch the guest; returns it and the ms from launch to the agent answering."""
    disks = await make_disks(directory, ["vda"])
    config = guest_config(directory, disks, memory_mib=ram_mib, accel=accel)
    started = time.perf_counter()
    vm = await VM.launch(config, state_dir=directory / "state", timeout=60.0)
    assert config.qga_socket is not None
    answered = await wait_agent(config.qga_socket, timeout=120.0)
    return vm, (answered - started) * 1000


async def _dirty(qga_socket: str) -> None:
    """What a test would do: files in RAM, a process."""
    async with GuestAgent(qga_socket, timeout=10.0) as agent:
        await agent.exec("/bin/sh", ["-c", "echo x > /tmp/junk; sleep 4242 >/dev/null 2>&1 &"])


async def bench_ram(ram_mib: int, repeat: int, accel: str, scratch: Path) -> dict[str, Any]:
    boots: list[float] = []
    resets_running: list[float] = []
    resets_responsive: list[float] = []
    method = ""
    for i in range(max(1, repeat // 2)):
        directory = scratch / f"boot{ram_mib}-{i}"
        directory.mkdir()
        vm, boot_ms = await _boot(directory, ram_mib, accel)
        boots.append(boot_ms)
        async with vm:
            if i:
                continue
            qga = str(directory / "qga.sock")
            await golden(vm, "golden")
            for _ in range(repeat):
                await _dirty(qga)
                started = time.perf_counter()
                report = await reset(vm, "golden")
                running = time.perf_counter()
                answered = await wait_agent(qga, timeout=60.0)
                method = report.method
                resets_running.append((running - started) * 1000)
                resets_responsive.append((answered - started) * 1000)
        shutil.rmtree(directory, ignore_errors=True)
    return {
        "ram_mib": ram_mib,
        "method": method,
        "reset_running_ms": resets_running,
        "reset_responsive_ms": resets_responsive,
        "fresh_boot_responsive_ms": boots,
    }


def _med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(results: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| guest RAM | reset → running (median / max ms) | reset → agent answers (median ms)"
        " | fresh boot → agent answers (median ms) | reset speed-up |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        run, resp, boot = (
            r["reset_running_ms"],
            r["reset_responsive_ms"],
            r["fresh_boot_responsive_ms"],
        )
        lines.append(
            f"| {r['ram_mib']} MiB | {_med(run):.0f} / {max(run):.0f} | {_med(resp):.0f}"
            f" | {_med(boot):.0f} | {_med(boot) / _med(resp):.0f}x |"
        )
    method = results[0]["method"] if results else "?"
    return "\n".join([*lines, "", f"Reset method: {method}."])


async def main_async(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="qsr-", dir="/tmp"))
    results = []
    try:
        for ram_mib in args.ram:
            print(f"reset benchmark: {ram_mib} MiB guest", file=sys.stderr, flush=True)
            results.append(await bench_ram(ram_mib, args.repeat, args.accel, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    document = {
        "machine": machine_info(args.accel),
        "accel": choose_accel(args.accel),
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(table(results))
    return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(main_async(args))
