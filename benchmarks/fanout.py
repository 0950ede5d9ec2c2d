"""``scripts/bench --fanout``: N guests from one checkpoint (clones) against N fresh boots.

For N = 1, 2, 4 (``--workers``): boot N test guests at once and time until every one's guest
agent answers; then boot one guest, take an external checkpoint (timed apart), stop it, start N
clones of the checkpoint at once (:meth:`qemusnap.VM.clone`) and time until every clone's agent
answers, as pytest-xdist workers do.  Then the example harness (examples/harness) is run with
``pytest -n 0/2/4`` and its wall time measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from qemusnap import VM
from qemusnap.machine import choose_accel, wait_pid_exit

from .guest import guest_config, make_disks, wait_agent
from .report import busy_now, machine_info

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKERS = (1, 2, 4)
HARNESS_WORKERS = (0, 2, 4)


def log(message: str) -> None:
    print(f"fanout: {message}", file=sys.stderr, flush=True)


async def _quit(vm: VM) -> None:
    """Shut a VM down, a launched one or a clone (closing a clone leaves it running)."""
    if vm.machine is None and vm.monitor is not None:
        pid = vm.monitor.peer_pid()
        try:
            await vm.monitor.quit()
        finally:
            await vm.close()
        if pid is not None:
            await wait_pid_exit(pid, 30.0)
        return
    await vm.close()


async def fresh_boots(n: int, ram_mib: int, accel: str, scratch: Path) -> float:
    """Seconds from starting ``n`` guests at once until every agent answers."""
    configs = []
    for i in range(n):
        directory = scratch / f"boot{n}-{i}"
        directory.mkdir()
        disks = await make_disks(directory, ["vda"])
        configs.append(guest_config(directory, disks, memory_mib=ram_mib, accel=accel))
    started = time.perf_counter()
    vms = await asyncio.gather(*(VM.launch(c, timeout=60.0, state_dir=scratch / f"s{n}-{i}")
                                 for i, c in enumerate(configs)))  # fmt: skip
    try:
        answered = await asyncio.gather(
            *(wait_agent(c.qga_socket or "", timeout=300.0) for c in configs)
        )
        return max(answered) - started
    finally:
        await asyncio.gather(*(_quit(vm) for vm in vms))


async def checkpoint(ram_mib: int, accel: str, scratch: Path) -> tuple[str, float, float]:
    """Boot one guest, take external checkpoint "golden", stop it: (state dir, boot seconds,
    checkpoint seconds)."""
    directory = scratch / "source"
    directory.mkdir()
    disks = await make_disks(directory, ["vda"])
    config = guest_config(directory, disks, memory_mib=ram_mib, accel=accel)
    state = str(directory / "state")
    started = time.perf_counter()
    async with await VM.launch(config, state_dir=state, timeout=60.0) as vm:
        booted = await wait_agent(config.qga_socket or "", timeout=300.0) - started
        started = time.perf_counter()
        await vm.create("golden", memory_file=str(directory / "golden.mem"))
        took = time.perf_counter() - started
    return state, booted, took


async def clones(n: int, state: str, scratch: Path) -> tuple[float, list[float]]:
    """Seconds from starting ``n`` clones at once until every agent answers; and each clone's
    own "start -> agent answers" seconds."""
    started = time.perf_counter()

    async def one(i: int) -> tuple[VM, float]:
        async with await VM.cold([], state_dir=state) as source:
            clone = await source.clone("golden", str(scratch / f"c{n}-{i}"))
        answered = await wait_agent(str(scratch / f"c{n}-{i}" / "qs-qga0.sock"), timeout=300.0)
        return clone, answered - started

    done = await asyncio.gather(*(one(i) for i in range(n)))
    try:
        each = [seconds for _, seconds in done]
        return max(each), each
    finally:
        await asyncio.gather(*(_quit(vm) for vm, _ in done))
        for i in range(n):
            shutil.rmtree(scratch / f"c{n}-{i}", ignore_errors=True)


def harness_wall(workers: int) -> tuple[float, int]:
    """Wall seconds of ``pytest examples/harness -n WORKERS`` and its exit status."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT / "examples" / "harness", capture_output=True, text=True)
    seconds = time.perf_counter() - started
    tail = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr.strip()
    log(f"pytest -n {workers}: {seconds:.1f} s ({tail})")
    return seconds, done.returncode


def table(document: dict[str, Any]) -> str:
    rows = document["fanout"]
    lines = [
        "| N guests | N fresh boots → every agent answers (s) | N clones → every agent answers"
        " (s) | each clone after the first adds (s) |",
        "|---:|---:|---:|---:|",
    ]
    first = next((r["clones_s"] for r in rows if r["n"] == 1), None)
    for r in rows:
        extra = (
            f"{(r['clones_s'] - first) / (r['n'] - 1):.2f}"
            if first is not None and r["n"] > 1
            else "-"
        )
        lines.append(f"| {r['n']} | {r['fresh_boots_s']:.1f} | {r['clones_s']:.1f} | {extra} |")
    source = document["source"]
    lines += [
        "",
        f"Once, before the clones: boot {source['boot_s']:.1f} s, external checkpoint"
        f" {source['checkpoint_s']:.1f} s ({document['ram_mib']} MiB guest).",
        "",
        "| example harness (examples/harness) | wall time (s) | exit |",
        "|---|---:|---:|",
    ]
    for h in document["harness"]:
        lines.append(f"| pytest -n {h['workers']} | {h['wall_s']:.1f} | {h['exit']} |")
    machine = document["machine"]
    lines += [
        "",
        f"Machine: {machine['cores']} cores ({machine['cpu']}), {machine['accel']},"
        f" {machine['qemu']}; load at start: {machine['busy_at_start']}, at end:"
        f" {machine['busy_at_end']}.",
    ]
    return "\n".join(lines)


async def measure(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    ram = args.ram[0] if args.ram else 256
    document: dict[str, Any] = {
        "command": args.command,
        "machine": machine_info(args.accel),
        "accel": choose_accel(args.accel),
        "ram_mib": ram,
        "fanout": [],
    }
    log(f"booting the source guest ({ram} MiB) and taking its checkpoint")
    state, boot, took = await checkpoint(ram, args.accel, scratch)
    document["source"] = {"boot_s": boot, "checkpoint_s": took}
    for n in args.workers:
        boots: list[float] = []
        clone_runs: list[tuple[float, list[float]]] = []
        for _ in range(args.repeat):
            log(f"{n} fresh boots")
            boots.append(await fresh_boots(n, ram, args.accel, scratch / f"b{len(boots)}"))
            log(f"{n} clones")
            clone_runs.append(await clones(n, state, scratch))
        document["fanout"].append(
            {
                "n": n,
                "fresh_boots_s": statistics.median(boots),
                "clones_s": statistics.median(c[0] for c in clone_runs),
                "fresh_boots_runs_s": boots,
                "clones_runs_s": [c[0] for c in clone_runs],
                "each_clone_s": [c[1] for c in clone_runs],
            }
        )
    return document


def run(args: argparse.Namespace) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="qsf-", dir="/tmp"))
    try:
        for i in range(args.repeat):
            (scratch / f"b{i}").mkdir()
        document = asyncio.run(measure(args, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    document["harness"] = []
    for workers in HARNESS_WORKERS:
        seconds, status = harness_wall(workers)
        document["harness"].append({"workers": workers, "wall_s": seconds, "exit": status})
    document["machine"]["busy_at_end"] = busy_now()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(table(document))
    print(f"Full results: {args.json}", file=sys.stderr)
    return 0 if all(h["exit"] == 0 for h in document["harness"]) else 1


def workers_list(text: str) -> list[int]:
    try:
        values = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("worker counts are at least 1")
    return values
