"""Crash safety, proved with real crashes (issue 6, items 1 and 2).

For every crash point of every operation (:data:`qemusnap.faults.CRASH_POINTS`) and every
variant of that operation that passes it: build a VM with internal and external snapshots (each
holding its own byte pattern on both disks), run the operation through the CLI with
``QEMUSNAP_CRASH_AT`` so that qemusnap SIGKILLs itself there, then run the next commands
(``list``, ``recover``, ``list``) and check the invariants:

* no image corrupt (``qemu-img check`` clean after a flush, or leaks only, repaired cold);
* no file orphaned, none missing (every image/memory file is the user's disk or referenced by
  the store; everything the store names exists);
* the VM qemusnap had paused (or stopped, to restart it) runs again;
* the operation's snapshot is complete and listed, or absent with its files removed;
* the disks hold the pre- or the post-operation content (and ``current`` agrees);
* every listed snapshot still reverts to its exact patterns on both disks.

The VM is a firmware-only TCG QEMU that the test launches itself with a QMP socket path (as a
user would); memory files and internal vmstate are real migration streams of it, so a snapshot
listed with a half-written memory file fails its revert.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from crashrig import (
    DISKS,
    MIB,
    QEMUSNAP,
    Rig,
    boot_guest,
    check_files,
    check_images,
    check_snapshot_state,
    expect_content,
    listed,
    run_and_kill,
    wait_status,
)

from qemusnap.faults import CRASH_POINTS
from qemusnap.monitor import Monitor

pytestmark = [pytest.mark.qemu_system, pytest.mark.qemu_img]

P1, P2, P3, P4, P5, P6 = 0x11, 0x22, 0x33, 0x44, 0x55, 0x66


@dataclasses.dataclass
class Op:
    """The operation under test, as set up: its CLI arguments and what it should do."""

    args: list[str]
    pre: int  # pattern of both disks before
    post: int  # ... and after it completes
    made: str | None = None  # the snapshot it creates
    removed: str | None = None  # ... or deletes
    target: str | None = None  # ... or reverts to
    ends_off: bool = False  # complete, it leaves QEMU stopped (save)
    starts_off: bool = False  # it starts with QEMU stopped (restore)


def std(rig: Rig) -> None:
    """i1: internal, in the user's images; e1: external (freezing them); the disks hold P3."""
    rig.put(P1)
    rig.snap("i1", "--internal", "--disk-only")
    rig.put(P2)
    rig.snap("e1", "--disk-only")
    rig.put(P3)


def create(*flags: str) -> Callable[[Rig], Op]:
    def setup(rig: Rig) -> Op:
        std(rig)
        argv = [str(rig.tmp / "new.mem") if f == "MEM" else f for f in flags]
        return Op(["create", "new", *argv], P3, P3, made="new")

    return setup


def reverting(rig: Rig, name: str, post: int) -> Op:
    """Revert to ``name``.  If it is the current snapshot, "z" is taken first (internal, in
    the active images) and becomes current, so that "current" tells whether the revert
    happened."""
    if rig.current_snapshot == name:
        rig.snap("z", "--internal", "--disk-only")
    return Op(["revert", name, "--force"], P3, post, target=name)


def revert_std(name: str, post: int) -> Callable[[Rig], Op]:
    """i1 is internal in images e1 froze (reverting clones them); e1 is external."""

    def setup(rig: Rig) -> Op:
        std(rig)
        return reverting(rig, name, post)

    return setup


def revert_checkpoint(kind: str) -> Callable[[Rig], Op]:
    """i1 is an internal checkpoint, in the active images (snapshot-load in the same QEMU)
    or in images e1 froze (QEMU restarts on clones, then snapshot-load); or e1 is an
    external checkpoint (QEMU restarts with -incoming defer, the memory file is loaded)."""

    def setup(rig: Rig) -> Op:
        rig.put(P1)
        if kind == "in-place":
            rig.snap("e1", "--disk-only")
        elif kind == "clone":
            rig.snap("i1")
        else:
            rig.snap("i1", "--internal", "--disk-only")
        rig.put(P2)
        if kind == "in-place":
            rig.snap("i1")
        elif kind == "clone":
            rig.snap("e1", "--disk-only")
        else:
            rig.snap("e1", "--memory-file", rig.tmp / "e1.mem")
        rig.put(P3)
        if kind == "external":
            return reverting(rig, "e1", P2)
        return reverting(rig, "i1", P2 if kind == "in-place" else P1)

    return setup


def delete_internal(rig: Rig) -> Op:
    """Delete internal checkpoint i1 (snapshot-delete job); its child i2 moves to e1."""
    rig.put(P1)
    rig.snap("e1", "--disk-only")
    rig.put(P2)
    rig.snap("i1")
    rig.put(P3)
    rig.snap("i2", "--internal", "--disk-only")
    rig.put(P4)
    return Op(["delete", "i1"], P4, P4, removed="i1")


def delete_commit(rig: Rig) -> Op:
    """Delete e1: its image (the user's base) has one dependent, committed into it
    (block-commit of an intermediate image); e2 moves to i1."""
    std(rig)
    rig.snap("e2", "--disk-only")
    rig.put(P4)
    return Op(["delete", "e1"], P4, P4, removed="e1")


def delete_pull(rig: Rig) -> Op:
    """Delete e1, whose image backs two branches (e2's, and e3's after a revert to e1): its
    data is pulled into both (qemu-img rebase for the idle branch, block-stream for the one
    in use); e2 and e3 move to e0."""
    rig.put(P1)
    rig.snap("i1", "--internal", "--disk-only")
    rig.put(P2)
    rig.snap("e0", "--disk-only")
    rig.put(P3)
    rig.snap("e1", "--disk-only")
    rig.put(P4)
    rig.snap("e2", "--disk-only")
    rig.qs("revert", "e1", "--force", live=True)
    rig.current, rig.current_snapshot = P3, "e1"
    rig.put(P5)
    rig.snap("e3", "--disk-only")
    rig.put(P6)
    return Op(["delete", "e1"], P6, P6, removed="e1")


def save(rig: Rig) -> Op:
    std(rig)
    return Op(["save", str(rig.tmp / "saved.state")], P3, P3, ends_off=True)


def restore(rig: Rig) -> Op:
    std(rig)
    rig.qs("save", rig.tmp / "saved.state", live=True)
    return Op(["restore", str(rig.tmp / "saved.state")], P3, P3, starts_off=True)


def rebuild_lost(rig: Rig) -> Op:
    """The state directory is lost (i1 internal, e1 external); rebuild reads the images and
    the sidecars beside them.  Killed in the middle, the next command's first contact (or
    ``rebuild`` again, tests/integration/test_rebuild.py) finishes the job."""
    std(rig)
    shutil.rmtree(rig.state)
    return Op(["rebuild"], P3, P3)


@dataclasses.dataclass(frozen=True)
class Variant:
    operation: str
    name: str
    passes: tuple[str, ...]  # the crash points it passes
    setup: Callable[[Rig], Op]


ALL = "all"
VARIANTS = [
    Variant("create-internal", "checkpoint", (ALL,), create()),
    Variant("create-internal", "disk-only", (ALL,), create("--internal", "--disk-only")),
    Variant("create-external", "disk-only",
            ("journaled", "overlays-made", "nodes-added", "cut"), create("--disk-only")),
    Variant("create-external", "checkpoint", (ALL,), create("--memory-file", "MEM")),
    Variant("create-external", "live-checkpoint", (ALL,), create("--memory-file", "MEM", "--live")),
    Variant("revert", "internal-checkpoint-in-place", ("journaled", "overlays-made", "loaded"),
            revert_checkpoint("in-place")),
    Variant("revert", "internal-checkpoint-clone", (ALL,), revert_checkpoint("clone")),
    Variant("revert", "internal-clone",
            ("journaled", "overlays-made", "stopped", "spawned", "started"), revert_std("i1", P1)),
    Variant("revert", "external", ("journaled", "overlays-made", "stopped", "spawned", "started"),
            revert_std("e1", P2)),
    Variant("revert", "external-checkpoint",
            ("journaled", "overlays-made", "stopped", "spawned", "started"),
            revert_checkpoint("external")),
    Variant("delete-internal", "checkpoint", (ALL,), delete_internal),
    Variant("delete-external", "commit", (ALL,), delete_commit),
    Variant("delete-external", "pull", (ALL,), delete_pull),
    Variant("save", "save", (ALL,), save),
    Variant("restore", "restore", (ALL,), restore),
    Variant("rebuild", "state-dir-lost", (ALL,), rebuild_lost),
]  # fmt: skip


def _cases() -> Iterator[object]:
    for operation, steps in CRASH_POINTS.items():
        for step in steps:
            for v in VARIANTS:
                if v.operation == operation and (step in v.passes or ALL in v.passes):
                    yield pytest.param(v, step, id=f"{operation}:{step}/{v.name}")


def test_every_crash_point_has_a_case() -> None:
    covered = {(c.values[0].operation, c.values[1]) for c in _cases()}  # type: ignore[attr-defined]
    every = {(op, step) for op, steps in CRASH_POINTS.items() for step in steps}
    assert covered == every
    for v in VARIANTS:
        assert all(s == ALL or s in CRASH_POINTS[v.operation] for s in v.passes)


@pytest.mark.parametrize(("variant", "step"), list(_cases()))
def test_crash(rig: Rig, variant: Variant, step: str) -> None:
    rig.launch()
    op = variant.setup(rig)
    if op.starts_off:
        assert rig.pid() is None
    before = rig.current_snapshot
    done = rig.qs(*op.args, live=not op.starts_off, crash=f"{variant.operation}:{step}",
                  expect=None)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, (
        f"no crash at {variant.operation}:{step}: exit {done.returncode}\n{done.stderr}"
    )
    # The next commands: a read-only one works as is, then recovery.
    rig.qs("list")
    rig.qs("recover")
    listing = listed(rig)

    # The VM runs (or, for a save, it may be stopped with its state saved).
    if rig.pid() is None:
        assert op.ends_off or (op.starts_off and step == "journaled"), (
            f"QEMU is gone after recovery\n{rig.describe()}"
        )
    else:
        assert wait_status(rig, "running") == "running", rig.describe()

    # Images, files, the operation's snapshot.
    leaks = check_images(rig)
    assert not leaks, f"leaked clusters (repaired): {leaks}\n{rig.describe()}"
    check_files(rig, listing.values())
    for name in (op.made, op.removed, op.target):
        if name:
            check_snapshot_state(rig, name, listing, made=name == op.made)
    if op.removed:
        assert op.removed in listing or all(s["parent"] != op.removed for s in listing.values())
    assert set(listing) - {op.made} == set(rig.patterns) - (
        set() if op.removed in listing else {op.removed}
    ), (listing.keys(), rig.patterns.keys())

    # The content now: before or after the operation, and "current" says which.
    content = expect_content(rig, [op.pre, op.post])
    if op.target and op.pre != op.post:
        current = next((n for n, s in listing.items() if s["current"]), None)
        wanted = op.target if content == op.post else before
        assert current == wanted, f"disks hold {content:#x}, current is {current}\n{rig.describe()}"
    if op.made in listing:
        rig.patterns[op.made] = op.pre
    if op.removed and op.removed not in listing:
        del rig.patterns[op.removed]

    # A stopped VM (after save) comes back from its saved state.
    if rig.pid() is None:
        saved = rig.tmp / "saved.state"
        assert saved.exists(), rig.describe()
        rig.qs("restore", saved)
        assert rig.pid() is not None and wait_status(rig, "running") == "running"
        expect_content(rig, [op.pre])

    expect_reverts(rig)


def expect_reverts(rig: Rig) -> None:
    """Every snapshot still reverts to its own bytes, and leaves nothing broken behind."""
    for name, pattern in sorted(rig.patterns.items()):
        rig.qs("revert", name, "--force", live=True)
        assert wait_status(rig, "running") == "running", rig.describe()
        assert rig.read() == [pattern, pattern], f"after revert {name}\n{rig.describe()}"
    assert not check_images(rig)
    check_files(rig, listed(rig).values())


# --- killed between crash points, while QEMU works on alone ------------------------------------


def expect_rolled_back(rig: Rig, made: str | None, content: int) -> None:
    """After ``recover``: the VM runs, the images and files are sound, ``made`` (if any) is
    absent with its files removed, the disks hold ``content``, every snapshot reverts."""
    rig.qs("recover")
    listing = listed(rig)
    assert set(listing) == set(rig.patterns), rig.describe()
    if made:
        check_snapshot_state(rig, made, listing, made=True)
    assert wait_status(rig, "running") == "running", rig.describe()
    assert not check_images(rig)
    check_files(rig, listing.values())
    expect_content(rig, [content])
    expect_reverts(rig)


@pytest.mark.guest
def test_killed_while_qemu_writes_memory(rig: Rig) -> None:
    """qemusnap dies while QEMU writes a checkpoint's memory file: QEMU finishes the
    migration alone and waits in "postmigrate", its images inactivated.  Recovery makes them
    usable again, rolls the unrecorded snapshot back (block-commit) and resumes the VM."""
    boot_guest(rig)
    std(rig)
    memory = rig.tmp / "c1.mem"
    argv = ["create", "c1", "--memory-file", str(memory)]
    run_and_kill(rig, argv, memory, 16 * MIB, victim="qemusnap")
    expect_rolled_back(rig, "c1", P3)


@pytest.mark.guest
def test_killed_while_qemu_loads_memory(rig: Rig) -> None:
    """qemusnap dies while the QEMU a revert restarted loads the checkpoint's memory file
    (``migrate-incoming``): QEMU goes on loading alone.  Recovery must wait for that load (a
    second ``migrate-incoming`` is refused; ``migrate_cancel`` does not apply to an incoming
    migration) and then settle the run state: the revert is finished.

    The file is served through a pipe, so that the load stalls, deterministically, until the
    test lets it go on: qemusnap is killed once QEMU has read 16 MiB, and the rest is written
    only after recovery has been running for longer than any wait it could hide behind."""
    boot_guest(rig)
    rig.put(P1)
    memory = rig.tmp / "c1.mem"
    # A stream, which a pipe can carry: a mapped-ram file (QEMU 9.0+) is read by seeking.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("QEMUSNAP_MAPPED_RAM", "0")
        rig.snap("c1", "--memory-file", memory)
    rig.put(P2)
    kept = rig.tmp / "c1.kept"
    memory.rename(kept)
    os.mkfifo(memory, 0o600)
    read_16_mib, go_on = threading.Event(), threading.Event()

    def serve() -> None:
        with open(memory, "wb") as pipe, open(kept, "rb") as source:
            pipe.write(source.read(16 * MIB))  # returns once QEMU has read nearly all of it
            read_16_mib.set()
            go_on.wait(120)
            shutil.copyfileobj(source, pipe)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    argv = [*QEMUSNAP, "--state", str(rig.state), "--qmp", str(rig.sock), "revert", "c1"]
    reverting = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert read_16_mib.wait(120), "the restarted QEMU never read the memory file"
        reverting.kill()
    finally:
        reverting.wait()
    recovering = subprocess.Popen(
        [*QEMUSNAP, "--state", str(rig.state), "--qmp", str(rig.sock), "recover"],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(8)
    go_on.set()
    _, err = recovering.communicate(timeout=120)
    server.join(30)
    assert recovering.returncode == 0, err
    memory.unlink()
    kept.rename(memory)
    rig.current, rig.current_snapshot = P1, "c1"
    assert rig.status() == "running", rig.describe()
    expect_content(rig, [P1])
    assert not check_images(rig)
    check_files(rig, listed(rig).values())
    expect_reverts(rig)


def test_killed_during_block_commit(rig: Rig) -> None:
    """qemusnap dies while QEMU runs the active block-commit of a delete (192 MiB): the job
    goes on and waits, READY, for a completion nobody sends.  Recovery cancels it and runs
    the journaled merge steps again."""
    for disk in rig.disks:
        subprocess.run(["qemu-img", "resize", "-q", str(disk), "256M"], check=True)
    rig.launch()
    std(rig)
    rig.current = P3
    rig.qmp(lambda m: fill(m, P3, "192M"), timeout=120)
    run_and_kill(rig, ["delete", "e1"], rig.disks[0], 32 * MIB, victim="qemusnap")
    del rig.patterns["e1"]
    expect_rolled_back(rig, None, P3)


async def fill(monitor: Monitor, pattern: int, length: str) -> None:
    for name in DISKS:
        await monitor.qemu_io(name, f"write -P 0x{pattern:02x} 0 {length}", timeout=120)
        await monitor.qemu_io(name, "flush")
