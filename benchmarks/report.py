"""Results: what ran where (machine info), per-operation outcomes, the Markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qemusnap.machine import choose_accel, qemu_binary

from .guest import ROOT, Fill
from .measure import Sample

NOT_BUILT = "not built yet"


@dataclass
class Outcome:
    """All repetitions of one operation on one guest."""

    status: str = "ok"  # ok | n/a (the engine does not support it) | error
    note: str = ""
    samples: list[Sample] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        """``wall_ms``, ``pause_ms`` or an ``extra`` key, over the samples that have it."""
        found = []
        for sample in self.samples:
            value = getattr(sample, metric) if metric in ("wall_ms", "pause_ms") else None
            value = sample.extra.get(metric, value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                found.append(float(value))
        return found

    def to_json(self) -> dict[str, Any]:
        summary = {}
        for metric in ("wall_ms", "pause_ms", *sorted({k for s in self.samples for k in s.extra})):
            values = self.values(metric)
            if values:
                summary[metric] = {"median": statistics.median(values), "max": max(values)}
        return {
            "status": self.status,
            "note": self.note,
            "summary": summary,
            "samples": [asdict(s) for s in self.samples],
        }


@dataclass
class GuestRun:
    """Everything measured on one guest (one RAM size)."""

    ram_mib: int
    fill: Fill | None = None
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    error: str = ""  # the run stopped early (boot or fill failed, ...)
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "ram_mib": self.ram_mib,
            "fill": self.fill.to_json() if self.fill else None,
            "error": self.error,
            "seconds": round(self.seconds, 1),
            "operations": {key: o.to_json() for key, o in self.outcomes.items()},
        }


# --- machine info -----------------------------------------------------------------------------


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except OSError as exc:
        return f"unknown ({exc.strerror})"
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else "unknown"


def _proc_field(path: str, key: str) -> str:
    for line in Path(path).read_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return "unknown"


def busy_now() -> str:
    """Load average and other QEMUs running: on a small machine they skew every number."""
    qemus = sum(
        1 for comm in Path("/proc").glob("[0-9]*/comm") if _read(comm).startswith("qemu-system")
    )
    return f"loadavg {' '.join(_read(Path('/proc/loadavg')).split()[:3])}, {qemus} QEMU running"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # a process that just exited
        return ""


def machine_info(accel: str) -> dict[str, Any]:
    mem_kib = int(_proc_field("/proc/meminfo", "MemTotal").split()[0])
    return {
        "cpu": _proc_field("/proc/cpuinfo", "model name"),
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "accel": choose_accel(accel),
        "qemu": _first_line([qemu_binary(), "--version"]),
        "python": platform.python_version(),
        # Read-only git: which code was measured.
        "qemusnap_commit": _first_line(["git", "rev-parse", "--short", "HEAD"]),
        "busy_at_start": busy_now(),
    }


# --- Markdown ---------------------------------------------------------------------------------

#: Table 1: (row label, operation key, wall metric, show the pause).
TIME_ROWS: tuple[tuple[str, str, str, bool], ...] = (
    ("internal checkpoint (`snapshot-save`)", "internal_checkpoint", "wall_ms", True),
    ("internal disk-only, 1 disk", "internal_disk_only_1", "wall_ms", True),
    ("internal disk-only, 4 disks", "internal_disk_only_4", "wall_ms", True),
    ("external disk-only, 1 disk", "external_disk_only_1", "wall_ms", True),
    ("external disk-only, 4 disks", "external_disk_only_4", "wall_ms", True),
    ("external checkpoint (`--memory-file`)", "external_checkpoint", "wall_ms", True),
    ("live external checkpoint (`--memory-file --live`)", "live_checkpoint", "wall_ms", True),
    (
        "live external checkpoint, guest RAM on huge pages",
        "live_checkpoint_hugepages",
        "wall_ms",
        True,
    ),
    ("quiesced disk-only, 4 disks: freeze → thaw window", "quiesced_disk_only", "freeze_ms", False),
    ("memory file write + fsync: `fd:` stream", "memory_write_fd", "wall_ms", False),
    ("memory file write + fsync: `file:` stream", "memory_write_file", "wall_ms", False),
    (
        "memory file write + fsync: mapped-ram + multifd",
        "memory_write_mapped_ram",
        "wall_ms",
        False,
    ),
    ("memory file load: stream", "memory_load_file", "wall_ms", False),
    ("memory file load: mapped-ram + multifd", "memory_load_mapped_ram", "wall_ms", False),
    ("revert internal checkpoint → running", "revert_internal", "running_ms", True),
    ("revert internal checkpoint → agent answers", "revert_internal", "agent_ms", False),
    ("revert internal checkpoint → counter continues", "revert_internal", "counter_ms", False),
    ("revert external checkpoint → running", "revert_external", "running_ms", True),
    ("revert external checkpoint → agent answers", "revert_external", "agent_ms", False),
    ("revert external checkpoint → counter continues", "revert_external", "counter_ms", False),
)

#: Table 2: (row label, operation key); the metric is always ``mib_s``.
THROUGHPUT_ROWS: tuple[tuple[str, str], ...] = (
    ("`dd bs=1M conv=fsync`, random data, RAM-sized", "dd"),
    ("internal checkpoint: vmstate size / wall", "internal_checkpoint"),
    # Like dd: data written (allocated blocks) over the time until it is synced to disk.
    ("memory file, `fd:` stream: written / (write + fsync)", "memory_write_fd"),
    ("memory file, `file:` stream: written / (write + fsync)", "memory_write_file"),
    ("memory file, mapped-ram + multifd: written / (write + fsync)", "memory_write_mapped_ram"),
)


def _num(value: float) -> str:
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _unavailable(outcome: Outcome | None) -> str | None:
    """The cell text of an operation without numbers, None if it has numbers."""
    if outcome is None:
        return "-"
    if outcome.samples:
        return None
    if outcome.status == "n/a":
        return f"n/a ({NOT_BUILT})" if NOT_BUILT in outcome.note else "n/a"
    return "error" if outcome.status == "error" else "-"


def _time_cells(outcome: Outcome | None, metric: str, show_pause: bool) -> list[str]:
    missing = _unavailable(outcome)
    if missing is not None:
        return [missing, missing.split(" ")[0]]  # "n/a (not built yet)" | "n/a"
    assert outcome is not None
    pauses, walls = outcome.values("pause_ms"), outcome.values(metric)
    pause = ""
    if show_pause:
        pause = f"{_num(statistics.median(pauses))} / {_num(max(pauses))}" if pauses else "-"
    wall = _num(statistics.median(walls)) if walls else "-"
    if outcome.status == "error":
        wall += " (error)"
    return [pause, wall]


def _header(runs: Sequence[GuestRun], columns: Sequence[str]) -> list[str]:
    names = ["operation"] + [f"{r.ram_mib} MiB {c}" for r in runs for c in columns]
    rule = ["---"] + ["---:"] * (len(names) - 1)
    return ["| " + " | ".join(names) + " |", "|" + "|".join(rule) + "|"]


def _state_mib(run: GuestRun) -> str:
    for key, metric in (
        ("internal_checkpoint", "vmstate_mib"),
        ("external_checkpoint", "file_mib"),
    ):
        outcome = run.outcomes.get(key)
        if outcome and outcome.values(metric):
            return f"{outcome.values(metric)[0]:.0f} MiB"
    return "unknown"


def markdown(
    runs: Sequence[GuestRun], info: dict[str, Any], *, command: str, repeat: int, seconds: float
) -> str:
    lines = [
        f"`{command}`: {repeat} repetitions, {seconds / 60:.1f} min",
        "",
        "Guest pause = QEMU `STOP` → `RESUME` event timestamps (median / max, ms; 0: the guest"
        " never stopped; -: QEMU was restarted, no events to measure); wall = the API call"
        " (median, ms). Revert rows: from the call until the guest runs (`query-status`), its"
        " agent answers `guest-ping`, and its counter (printed every second) continues from the"
        " snapshot's value; the last depends on where in its 1 s sleep the guest was saved."
        " Guest: the test guest under the accelerator below, 1 vCPU, 4 qcow2 disks of 64 MiB.",
        "",
    ]
    lines += _header(runs, ["pause ms (med / max)", "wall ms (med)"])
    for label, key, metric, show_pause in TIME_ROWS:
        cells = [c for run in runs for c in _time_cells(run.outcomes.get(key), metric, show_pause)]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += ["", "Write throughput (MiB/s, median / max):", ""]
    lines += _header(runs, ["MiB/s"])
    for label, key in THROUGHPUT_ROWS:
        cells = []
        for run in runs:
            outcome = run.outcomes.get(key)
            missing = _unavailable(outcome)
            values = outcome.values("mib_s") if outcome else []
            if missing is None and values:
                cells.append(f"{_num(statistics.median(values))} / {_num(max(values))}")
            else:
                cells.append(missing or "-")
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += ["", "Guest RAM filled with non-zero data (tmpfs `Shmem` in the guest):", ""]
    for run in runs:
        if run.fill:
            f = run.fill
            lines.append(
                f"- {run.ram_mib} MiB: {f.percent} % ({f.shmem_mib:.0f} MiB, of which"
                f" {f.written_mib} MiB written by the benchmark in {f.seconds:.0f} s; the guest"
                f" kernel sees {f.mem_total_mib:.0f} MiB); memory state written per checkpoint:"
                f" {_state_mib(run)}"
            )
        else:
            lines.append(f"- {run.ram_mib} MiB: not filled ({run.error or 'not run'})")
    problems = [
        f"- {run.ram_mib} MiB, {key}: {o.status}: {o.note}"
        for run in runs
        for key, o in run.outcomes.items()
        if o.status != "ok"
    ] + [f"- {run.ram_mib} MiB: stopped early: {run.error}" for run in runs if run.error]
    if problems:
        lines += ["", "Not measured:", "", *problems]
    lines += ["", "Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    return "\n".join(lines) + "\n"
