"""``scripts/bench --scale``: what an operation costs as snapshots accumulate (issue 16).

Cold mode (no QEMU process: everything qemusnap does is ``qemu-img`` work plus its own),
one 64 MiB qcow2 disk:

* internal: the image grows to 10, 100 and 1,000 internal snapshots (taken by qemusnap); at
  each count, ``create``, ``revert`` and ``delete`` of one more snapshot through the Python
  API, beside the raw ``qemu-img snapshot -c``/``-a``/``-d`` of a tag on the same image;
  ``list --tree`` rendering, and one ``qemusnap create`` through the CLI (a process per call).
* external: a backing chain 16, 64 and 256 images deep (``create --disk-only``); at each depth
  ``create --disk-only``, ``delete`` of that newest snapshot (a commit of the empty overlay),
  ``revert`` to the previous one (a new overlay), and ``check`` of the whole chain, beside the
  raw ``qemu-img create -u``/``commit``/``check`` for the same step.

Every figure is the median of ``--repeat`` runs, in milliseconds.  "overhead" is qemusnap's
time minus the raw command's: what qemusnap adds (process starts of its probes, the state
database, Python).  The raw commands run on the same image, so they see the same snapshot
table or chain.

    scripts/bench --scale                  # 10/100/1000 snapshots, chains 16/64/256
    scripts/bench --scale --quick          # 10/100, chains 16/64, 2 repetitions
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qemusnap import VM
from qemusnap.models import Chain

from .report import busy_now, machine_info

COUNTS = (10, 100, 1000)
DEPTHS = (16, 64, 256)
QUICK_COUNTS, QUICK_DEPTHS = (10, 100), (16, 64)
SIZE = "64M"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _raw(*argv: str) -> float:
    """Run one raw command, return its wall time in seconds."""
    began = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - began


async def _timed(step: Callable[[], Awaitable[object]]) -> float:
    began = time.perf_counter()
    await step()
    return time.perf_counter() - began


def _row(
    what: str, at: int, ours: list[float], raw: list[float] | None, raw_cmd: str
) -> dict[str, Any]:
    mine = statistics.median(ours)
    row: dict[str, Any] = {"operation": what, "at": at, "qemusnap_ms": _ms(mine), "raw": raw_cmd}
    if raw is not None:
        theirs = statistics.median(raw)
        row["raw_ms"] = _ms(theirs)
        row["overhead_ms"] = _ms(mine - theirs)
    return row


def _log(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:7.1f}s] {message}", file=sys.stderr, flush=True)


async def internal(
    scratch: Path, counts: Sequence[int], repeat: int, started: float
) -> list[dict[str, Any]]:
    disk = scratch / "int.qcow2"
    state = scratch / "int-state"
    _raw("qemu-img", "create", "-q", "-f", "qcow2", str(disk), SIZE)
    rows: list[dict[str, Any]] = []
    vm = await VM.cold([str(disk)], state_dir=state)
    async with vm:
        have = 0
        for count in counts:
            while have < count:
                await vm.create(f"s{have}")
                have += 1
            _log(f"internal: {count} snapshots", started)
            create, revert, delete = [], [], []
            raw_c, raw_a, raw_d = [], [], []
            for i in range(repeat):
                raw_c.append(_raw("qemu-img", "snapshot", "-c", "raw", str(disk)))
                raw_a.append(_raw("qemu-img", "snapshot", "-a", "raw", str(disk)))
                raw_d.append(_raw("qemu-img", "snapshot", "-d", "raw", str(disk)))
                name = f"m{count}-{i}"
                create.append(await _timed(functools.partial(vm.create, name)))
                revert.append(await _timed(functools.partial(vm.revert, f"s{count - 1}")))
                delete.append(await _timed(functools.partial(vm.delete, name)))
            # The tree as `list --tree` draws it (the store read and the rendering).
            tree = [await _timed(_async(lambda: vm.tree().render())) for _ in range(repeat)]
            rows += [
                _row("create (internal)", count, create, raw_c, "qemu-img snapshot -c"),
                _row("revert (internal)", count, revert, raw_a, "qemu-img snapshot -a"),
                _row("delete (internal)", count, delete, raw_d, "qemu-img snapshot -d"),
                _row("list --tree (API)", count, tree, None, ""),
            ]
            cli = []
            for i in range(repeat):
                argv = [
                    sys.executable,
                    "-m",
                    "qemusnap",
                    "--state",
                    str(state),
                    "--disk",
                    str(disk),
                ]
                cli.append(_raw(*argv, "create", f"c{count}-{i}"))
                await vm.delete(f"c{count}-{i}")
            rows.append(_row("create (CLI process)", count, cli, raw_c, "qemu-img snapshot -c"))
    return rows


def _async(fn: Callable[[], object]) -> Callable[[], Awaitable[object]]:
    async def run() -> object:
        return fn()

    return run


async def external(
    scratch: Path, depths: Sequence[int], repeat: int, started: float
) -> list[dict[str, Any]]:
    base = scratch / "ext.qcow2"
    state = scratch / "ext-state"
    _raw("qemu-img", "create", "-q", "-f", "qcow2", str(base), SIZE)
    rows: list[dict[str, Any]] = []
    vm = await VM.cold([str(base)], state_dir=state)
    async with vm:
        have = 0
        for depth in depths:
            while have < depth:
                await vm.create(f"e{have}", disk_only=True)
                have += 1
            _log(f"external: chain {depth + 1} images deep", started)
            create, delete, revert, check = [], [], [], []
            raw_create, raw_commit, raw_check = [], [], []
            for i in range(repeat):
                (active,) = [d.file for d in await vm.disks()]
                spare = scratch / f"raw-{depth}-{i}.qcow2"
                raw_create.append(
                    _raw(
                        "qemu-img",
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-b",
                        active,
                        "-F",
                        "qcow2",
                        "-u",  # as qemusnap makes an overlay: without opening the chain
                        str(spare),
                        SIZE,
                    )
                )
                raw_commit.append(_raw("qemu-img", "commit", "-q", str(spare)))
                spare.unlink()
                name = f"x{depth}-{i}"
                create.append(await _timed(functools.partial(vm.create, name, disk_only=True)))
                delete.append(await _timed(functools.partial(vm.delete, name)))
                revert.append(await _timed(functools.partial(vm.revert, f"e{depth - 1}")))
                check.append(await _timed(vm.check))
                raw_check.append(_raw_check_each((await vm.chains())[0]))
            rows += [
                _row("create --disk-only", depth, create, raw_create, "qemu-img create -u -b"),
                _row("delete newest (commit)", depth, delete, raw_commit, "qemu-img commit"),
                _row("revert (new overlay)", depth, revert, raw_create, "qemu-img create -u -b"),
                _row("check (whole chain)", depth, check, raw_check, "qemu-img check, each image"),
            ]
    return rows


def _raw_check_each(chain: Chain) -> float:
    """``qemu-img check`` of each image alone, as qemusnap runs it: the raw work of a check."""
    took = 0.0
    for image in chain.images:
        spec: dict[str, Any] = {
            "driver": image.format,
            "file": {"driver": "file", "filename": image.filename},
        }
        if image.backing_filename:
            spec["backing"] = None
        took += _raw("qemu-img", "check", "--output=json", "json:" + json.dumps(spec))
    return took


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], command: str, seconds: float) -> str:
    out = [
        f"`{command}`, {datetime.now(UTC).date()}: {info['cores']} cores ({info['cpu']}), "
        f"{info['qemu']}, Python {info['python']}, commit {info['qemusnap_commit']}; "
        f"{info['busy_at_start']} at start, {info['busy_at_end']} at the end; {seconds:.0f} s.",
        "",
        "| operation | snapshots / chain depth | qemusnap ms | raw ms | overhead ms"
        " | raw command |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        raw = f"{r['raw_ms']:.1f}" if "raw_ms" in r else "-"
        over = f"{r['overhead_ms']:.1f}" if "overhead_ms" in r else "-"
        out.append(
            f"| {r['operation']} | {r['at']} | {r['qemusnap_ms']:.1f} | {raw} | {over} |"
            f" {r['raw'] or '-'} |"
        )
    return "\n".join(out)


async def main_async(args: argparse.Namespace, command: str) -> int:
    started = time.perf_counter()
    info = machine_info(args.accel)
    counts = QUICK_COUNTS if args.quick else COUNTS
    depths = QUICK_DEPTHS if args.quick else DEPTHS
    repeat = args.repeat
    scratch = Path(tempfile.mkdtemp(prefix="qss-", dir="/tmp"))
    try:
        rows = await internal(scratch, counts, repeat, started)
        rows += await external(scratch, depths, repeat, started)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - started
    info["busy_at_end"] = busy_now()
    document = {
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "repeat": repeat,
        "machine": info,
        "seconds": round(seconds, 1),
        "rows": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(markdown(rows, info, command, seconds))
    print(f"Full results: {args.json}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    argv = sys.argv[1:]
    command = shlex.join(["scripts/bench", *argv])
    return asyncio.run(main_async(args, command))
