"""``scripts/bench``: how long qemusnap's snapshots take, measured on the booted test guest.

For each guest RAM size: boot the test guest (TCG here) with 4 qcow2 disks, fill at least 75 %
of its RAM with non-zero data through the guest agent, then time every operation ``--repeat``
times; then boot it again with its RAM on 2 MiB huge pages (``MachineConfig.hugepages``,
reserving ``vm.nr_hugepages`` for the run) and time the live checkpoint there too. Prints a
Markdown table on stdout (progress on stderr) and writes everything as JSON.

    scripts/bench --quick                  # 512 MiB only, 2 repetitions
    scripts/bench --ram 512,1024,2048      # the default
    scripts/bench --scale                  # cost vs snapshot count (benchmarks/scale.py)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs

from qemusnap import VM, UnsupportedError, hostmem
from qemusnap.capabilities import MemoryMechanism
from qemusnap.machine import choose_accel
from qemusnap.memory import MemoryFiles
from qemusnap.models import MemoryFormat

from . import fanout, measure, reset, scale, transports
from .guest import MIN_FILL_PERCENT, Log, Serial, fill_ram, guest_config, make_disks
from .measure import Sample, Target
from .report import GuestRun, Outcome, busy_now, machine_info, markdown

DISKS = ("vda", "vdb", "vdc", "vdd")
DEFAULT_RAM = (512, 1024, 2048)
DEFAULT_REPEAT, QUICK_REPEAT = 3, 2


def _ram_list(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of MiB sizes: {text!r}") from None
    if not sizes or min(sizes) < 256:
        raise argparse.ArgumentTypeError("sizes are in MiB, at least 256 each")
    return sizes


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"not a positive number: {text!r}")
    return int(text)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--ram",
        type=_ram_list,
        help="guest RAM sizes in MiB, comma-separated (default 512,1024,2048; --quick: 512)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="512 MiB only and fewer repetitions (a smoke run)"
    )
    parser.add_argument(
        "--reset",
        action="store_true",
        help="the harness kit's per-test reset beside a fresh boot (256,512,1024 MiB)",
    )
    parser.add_argument(
        "--fanout",
        action="store_true",
        help="N clones of one checkpoint against N fresh boots (N = --workers), and the"
        " example harness's wall time at pytest -n 0/2/4 (256 MiB guest unless --ram)",
    )
    parser.add_argument(
        "--workers",
        type=fanout.workers_list,
        default=list(fanout.DEFAULT_WORKERS),
        help="--fanout: numbers of guests, comma-separated (default 1,2,4)",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="cost per operation at 10/100/1000 snapshots and chains 16/64/256 deep (cold)",
    )
    parser.add_argument(
        "--repeat",
        type=_positive,
        help=f"repetitions of each operation (default {DEFAULT_REPEAT}, --quick {QUICK_REPEAT})",
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where the full results go (default bench-results/bench.json, reset.json)",
    )
    parser.add_argument(
        "--accel", default="auto", help="QEMU accelerator: auto (default), kvm or tcg"
    )
    parser.add_argument(
        "--fill",
        type=float,
        default=80.0,
        help=f"share of guest RAM to fill, in %% (default 80; at least {MIN_FILL_PERCENT:g})",
    )
    args = parser.parse_args(argv)
    if args.fill < MIN_FILL_PERCENT or args.fill > 95:
        parser.error(f"--fill must be between {MIN_FILL_PERCENT:g} and 95")
    if args.scale:
        args.repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
        args.json = args.json or Path("bench-results/scale.json")
        return args
    if args.fanout:
        args.repeat = args.repeat or 1
        args.json = args.json or Path("bench-results/fanout.json")
        return args
    if args.reset:
        args.ram = args.ram or ([512] if args.quick else list(reset.DEFAULT_RAM))
        args.repeat = args.repeat or (QUICK_REPEAT if args.quick else 5)
        args.json = args.json or Path("bench-results/reset.json")
        return args
    args.ram = args.ram or ([512] if args.quick else list(DEFAULT_RAM))
    args.repeat = args.repeat or (QUICK_REPEAT if args.quick else DEFAULT_REPEAT)
    args.json = args.json or Path("bench-results/bench.json")
    return args


def _describe(sample: Sample) -> str:
    parts = [f"wall {sample.wall_ms:.0f} ms"]
    if sample.pause_ms is not None:
        parts.append(f"pause {sample.pause_ms:.1f} ms")
    parts += [f"{key} {value}" for key, value in sample.extra.items()]
    return ", ".join(parts)


class Runner:
    """Runs the operations on one guest, repeating each and recording its outcome."""

    def __init__(self, target: Target, run: GuestRun, repeat: int, log: Log) -> None:
        self.target, self.run, self.repeat, self.log = target, run, repeat, log

    async def each(self, key: str, take: Callable[[int], Awaitable[Sample]]) -> Outcome:
        outcome = self.run.outcomes[key] = Outcome()
        for i in range(1, self.repeat + 1):
            try:
                sample = await take(i)
            except UnsupportedError as exc:
                outcome.status, outcome.note = "n/a", str(exc)
                self.log(f"{key}: n/a: {exc}")
                break
            except Exception as exc:
                # The engine is under construction: one failing operation must not lose the
                # numbers of all the others.
                outcome.status, outcome.note = "error", f"{type(exc).__name__}: {exc}"
                self.log(f"{key} {i}/{self.repeat}: ERROR {outcome.note}")
                break
            outcome.samples.append(sample)
            self.log(f"{key} {i}/{self.repeat}: {_describe(sample)}")
        return outcome

    async def revert_to(self, key: str, candidates: Sequence[tuple[str, Outcome]]) -> None:
        """Time reverts to the first checkpoint that could be taken of ``candidates``."""
        usable = [name for name, made in candidates if made.samples]
        if usable:
            await self.each(key, lambda _: measure.revert(self.target, usable[0]))
            return
        # Nothing to revert to: say why (n/a while checkpoints are not built yet).
        first = candidates[0][1]
        self.run.outcomes[key] = Outcome(first.status, f"no checkpoint to revert to: {first.note}")

    def _disk_only(self, disks: int, *, internal: bool) -> Callable[[int], Awaitable[Sample]]:
        prefix = "id" if internal else "xd"

        def take(i: int) -> Awaitable[Sample]:
            name = f"{prefix}{disks}-{i}"
            return measure.disk_only(self.target, name, disks=disks, internal=internal)

        return take

    async def transports(self) -> None:
        """Memory-file write (+ fsync) per transport this QEMU has, then loads of the last
        file of each format (see benchmarks/transports.py)."""
        t = self.target
        caps = await t.monitor.capabilities()
        files: dict[str, Path] = {}
        for key, mechanism in transports.mechanisms(caps, MemoryFiles().channels).items():
            if isinstance(mechanism, str):
                self.run.outcomes[f"memory_write_{key}"] = Outcome("n/a", mechanism)
                continue
            path = t.directory / "memory" / f"{key}.mem"

            def take(_: int, path: Path = path, mechanism: MemoryMechanism = mechanism) -> Any:
                transports.remove(path)
                return transports.memory_write(t, path, mechanism)

            if (await self.each(f"memory_write_{key}", take)).samples:
                files[key] = path
        loads = (("file", MemoryFormat.STREAM), ("mapped_ram", MemoryFormat.MAPPED_RAM))
        for key, fmt in loads:
            path_or_none = files.get(key) or (files.get("fd") if key == "file" else None)
            if path_or_none is None:
                self.run.outcomes[f"memory_load_{key}"] = Outcome("n/a", f"no {fmt} file written")
                continue
            loaded: Path = path_or_none
            await self.each(
                f"memory_load_{key}",
                lambda _, p=loaded, f=fmt: transports.memory_load(t, p, f),  # type: ignore[misc]
            )
        for path in files.values():
            transports.remove(path)

    async def all(self, ram_mib: int) -> None:
        t = self.target
        checkpoint = await self.each(
            "internal_checkpoint", lambda i: measure.internal_checkpoint(t, f"ic{i}")
        )
        await self.revert_to("revert_internal", [("ic1", checkpoint)])
        for n in (1, 4):
            await self.each(f"internal_disk_only_{n}", self._disk_only(n, internal=True))
        await self.each("dd", lambda _: measure.dd_write(t.directory, ram_mib))
        await self.transports()
        # External snapshots last: once built, they move the disks onto overlays (and a revert
        # of an external checkpoint restarts QEMU).
        for n in (1, 4):
            await self.each(f"external_disk_only_{n}", self._disk_only(n, internal=False))
        await self.each("quiesced_disk_only", lambda i: transports.quiesced_disk_only(t, f"qd{i}"))
        external = await self.each(
            "external_checkpoint",
            lambda i: measure.external_checkpoint(t, f"xc{i}", live=False),
        )
        live = await self.each(
            "live_checkpoint", lambda i: measure.external_checkpoint(t, f"lc{i}", live=True)
        )
        await self.revert_to("revert_external", [("xc1", external), ("lc1", live)])


async def bench_guest(ram_mib: int, args: argparse.Namespace, scratch: Path, log: Log) -> GuestRun:
    """Everything on a guest of ``ram_mib``; then the live checkpoint again on a guest whose RAM
    is on huge pages (see qemusnap.hostmem: QEMU 7.2's pause has a per-host-page term)."""
    run = GuestRun(ram_mib)
    started = time.perf_counter()
    try:
        await on_guest(scratch / f"r{ram_mib}", run, args, log, lambda runner: runner.all(ram_mib))
        await huge_page_guest(scratch / f"h{ram_mib}", run, args, log)
    except Exception as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        log(f"ERROR {run.error}")
    finally:
        run.seconds = time.perf_counter() - started
    return run


async def on_guest(
    directory: Path,
    run: GuestRun,
    args: argparse.Namespace,
    log: Log,
    work: Callable[[Runner], Awaitable[None]],
    *,
    hugepages: bool = False,
) -> None:
    """Boot the test guest with 4 disks in ``directory``, fill its RAM, run ``work``; then
    remove the directory (it holds gigabytes of memory files)."""
    started = time.perf_counter()
    directory.mkdir()
    vm: VM | None = None
    try:
        disks = await make_disks(directory, DISKS)
        config = guest_config(directory, disks, memory_mib=run.ram_mib, accel=args.accel)
        config = attrs.evolve(config, hugepages=hugepages)
        pages = ", RAM on huge pages" if hugepages else ""
        log(f"booting the test guest ({choose_accel(config.accel)}, {len(disks)} disks{pages})")
        vm = await VM.launch(config, state_dir=directory / "state", timeout=60.0)
        async with vm:
            serial = Serial(directory / "serial.log")
            await serial.wait_ready()
            log(f"guest ready after {time.perf_counter() - started:.1f} s ({busy_now()})")
            assert config.qga_socket is not None
            fill = await fill_ram(config.qga_socket, run.ram_mib, args.fill, log)
            log(f"guest RAM {fill.percent} % filled in {fill.seconds} s")
            run.fill = run.fill or fill
            target = Target(vm, serial, config.qga_socket, directory, DISKS)
            await work(Runner(target, run, args.repeat, log))
    finally:
        if vm is not None and vm.machine is not None:
            _remove_machine_log_dir(vm.machine.log_dir)
        shutil.rmtree(directory, ignore_errors=True)


async def huge_page_guest(
    directory: Path, run: GuestRun, args: argparse.Namespace, log: Log
) -> None:
    key = "live_checkpoint_hugepages"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(hostmem.huge_pages_free(run.ram_mib // hostmem.HUGE_PAGE_MIB))
        except (PermissionError, MemoryError) as exc:
            run.outcomes[key] = Outcome("n/a", f"no huge pages for the guest's RAM: {exc}")
            log(f"{key}: n/a: {exc}")
            return

        async def live_checkpoints(runner: Runner) -> None:
            t = runner.target
            await runner.each(key, lambda i: measure.external_checkpoint(t, f"hc{i}", live=True))

        await on_guest(directory, run, args, log, live_checkpoints, hugepages=True)


def _remove_machine_log_dir(log_dir: Path) -> None:
    """Machine (qemusnap.machine) keeps QEMU's log in a mkdtemp directory it never removes."""
    if log_dir.parent == Path(tempfile.gettempdir()) and log_dir.name.startswith("qemusnap-"):
        shutil.rmtree(log_dir, ignore_errors=True)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


async def main_async(args: argparse.Namespace, command: str) -> int:
    started = time.perf_counter()
    info = machine_info(args.accel)
    document: dict[str, Any] = {
        "command": command,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "repeat": args.repeat,
        "fill_target_percent": args.fill,
        "machine": info,
        "runs": [],
    }
    runs: list[GuestRun] = []
    # Short paths: UNIX socket names (the guest agent's) must stay below 108 bytes.
    scratch = Path(tempfile.mkdtemp(prefix="qsb-", dir="/tmp"))
    try:
        for ram_mib in args.ram:

            def log(message: str, ram_mib: int = ram_mib) -> None:
                elapsed = time.perf_counter() - started
                print(f"[{elapsed:6.1f}s] {ram_mib} MiB: {message}", file=sys.stderr, flush=True)

            runs.append(await bench_guest(ram_mib, args, scratch, log))
            # Write as we go: the numbers of a long run survive an interruption.
            document["runs"] = [r.to_json() for r in runs]
            write_json(args.json, document)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    seconds = time.perf_counter() - started
    info["busy_at_end"] = busy_now()
    document["seconds"] = round(seconds, 1)
    write_json(args.json, document)
    print(markdown(runs, info, command=command, repeat=args.repeat, seconds=seconds))
    print(f"Full results: {args.json}", file=sys.stderr)
    failed = any(r.error or any(o.status == "error" for o in r.outcomes.values()) for r in runs)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["scripts/bench", *(sys.argv[1:] if argv is None else argv)])
    if args.scale:
        return scale.run(args)
    if args.fanout:
        args.command = command
        return fanout.run(args)
    if args.reset:
        return reset.run(args)
    return asyncio.run(main_async(args, command))


if __name__ == "__main__":
    sys.exit(main())
