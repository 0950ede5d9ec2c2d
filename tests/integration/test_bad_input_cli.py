"""Bad input through the command line, with real images and a running QEMU (issue 6, item 7;
SPEC section 3 and safety rule 8).

A table of snapshot names, paths (missing, a directory, a text file, raw, a dangling backing file,
an image a running QEMU holds), option combinations and QMP sockets that are not QEMU.  Each case
exits 1 or 2 (2: bad usage or input) with exactly one line on stderr and no traceback, and changes
nothing: every file of the test directory hashes the same before and after, and the state
directory lists no new snapshot and keeps no journal entry.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
from foreignvm import ForeignVM, cli, cli_json, tree_digest
from livevm import firmware_config

from qemusnap.store import Store

pytestmark = [pytest.mark.qemu_img, pytest.mark.qemu_system]


@attrs.frozen
class Lab:
    """``d``: images and files (hashed); ``run``: sockets and logs; ``state``: the state dir."""

    d: Path
    run: Path
    state: Path
    qmp: Path


def _qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    root = Path(tempfile.mkdtemp(prefix="qs-", dir="/tmp"))
    d, run, state = root / "d", root / "run", root / "state"
    d.mkdir()
    run.mkdir()
    lab = Lab(d, run, state, run / "qmp.sock")
    _qemu_img("create", "-q", "-f", "qcow2", d / "vda.qcow2", "8M")
    _qemu_img("create", "-q", "-f", "qcow2", d / "live.qcow2", "8M")
    _qemu_img("create", "-q", "-f", "raw", d / "raw.img", "1M")
    _qemu_img("create", "-q", "-f", "qcow2", d / "gone.qcow2", "1M")
    _qemu_img("create", "-q", "-f", "qcow2", "-b", d / "gone.qcow2", "-F", "qcow2",
              d / "dangling.qcow2")  # fmt: skip
    (d / "gone.qcow2").unlink()
    (d / "text.txt").write_text("just some text, not a disk image\n")
    (d / "adir").mkdir()
    cli("--disk", d / "vda.qcow2", "create", "s1", state=state)  # a snapshot that exists
    config = attrs.evolve(firmware_config([d / "live.qcow2"]), qmp_socket=str(lab.qmp))
    try:
        with ForeignVM(config, run / "qemu.log") as vm:
            cli("--qmp", vm.qmp, "list", state=state)  # known to the state directory
            yield lab
    finally:
        shutil.rmtree(root, ignore_errors=True)


COLD = ("--disk", "{d}/vda.qcow2")
LIVE = ("--qmp", "{qmp}")


def case(
    *args: str, expect: int | tuple[int, ...] = 2, says: str = "", marks: Any = (), id: str
) -> Any:
    """One row: the arguments, the exit status(es) allowed, a text stderr must contain."""
    return pytest.param(args, expect, says, marks=marks, id=id)


NAMES = [
    case(*COLD, "create", "", says="empty", id="name-empty"),
    case(*COLD, "create", "a/b", says="'/'", id="name-slash"),
    case(*COLD, "create", ".x", says="'.'", id="name-dot"),
    case(*COLD, "create", "x" * 201, says="201 characters", id="name-201-chars"),
    case(*COLD, "create", "a\x01b", says="control", id="name-control-char"),
    case(*COLD, "create", "tab\there", says="control", id="name-tab"),
    case(*COLD, "create", "del\x7f", says="control", id="name-del"),
    case(*COLD, "create", "../x", says="'/'", id="name-parent"),
    case(*COLD, "create", "..", says="'.'", id="name-dotdot"),
    case(*COLD, "create", "/abs/x", says="'/'", id="name-absolute"),
    case(*COLD, "create", "../../x", "--disk-only", says="'/'", id="name-parent-external"),
    case(*LIVE, "create", "../x", "--external", says="'/'", id="name-parent-checkpoint"),
    case(*LIVE, "create", "/tmp/x", "--disk-only", says="'/'", id="name-absolute-live"),
    case(*COLD, "create", "s1", says="exists", id="name-exists"),
]
PATHS = [
    case("--disk", "{d}/missing.qcow2", "create", "x", says="missing.qcow2", id="disk-missing"),
    case("--disk", "{d}/adir", "create", "x", says="adir",
         id="disk-directory"),
    case("--disk", "{d}/text.txt", "create", "x", says="text.txt", id="disk-text-file"),
    case("--disk", "{d}/raw.img", "create", "x", "--internal", says="raw", id="disk-raw-internal"),
    case("--disk", "{d}/raw.img", "create", "x", says="raw", id="disk-raw-create"),
    case("--disk", "{d}/dangling.qcow2", "create", "x", says="gone.qcow2",
         id="disk-dangling-backing"),
    case("--disk", "{d}/dangling.qcow2", "create", "x", "--disk-only", says="gone.qcow2",
         id="disk-dangling-backing-external"),
    case("--disk", "{d}/live.qcow2", "create", "x", expect=1, says="in use", id="disk-locked"),
    case("--disk", "{d}/live.qcow2", "create", "x", "--disk-only", expect=1, says="in use",
         id="disk-locked-external"),
    case("--disk", "{d}/live.qcow2", "check", "--repair", "leaks", expect=1, says="live.qcow2",
         id="disk-locked-repair"),
    case(*COLD, "create", "x", "--disk-only", "--overlay", "vda={d}/text.txt", says="exists",
         id="overlay-exists"),
    case(*COLD, "create", "x", "--disk-only", "--overlay", "vda={d}/nodir/o.qcow2",
         says="nodir", id="overlay-no-directory"),
    case(*LIVE, "create", "x", "--memory-file", "{d}/text.txt", says="exists",
         id="memory-file-exists"),
    case(*LIVE, "create", "x", "--memory-file", "{d}/nodir/m.mem", expect=(1, 2), says="nodir",
         id="memory-file-no-directory"),
    case(*LIVE, "save", "{d}/text.txt", says="exists", id="save-file-exists"),
    case(*LIVE, "restore", "{d}/text.txt", id="restore-running-vm"),
]  # fmt: skip
OPTIONS = [
    case(*COLD, "create", "x", "--overlay", "vda", says="DISK=PATH", id="overlay-without-equals"),
    case(*COLD, "create", "x", "--disk-only", "--overlay", "nope={d}/o.qcow2", says="nope",
         id="overlay-unknown-disk"),
    case(*COLD, "create", "x", "--internal", "--overlay", "vda={d}/o.qcow2", id="overlay-internal"),
    case(*COLD, "create", "x", "--exclude", "nope", says="nope", id="exclude-unknown-disk"),
    case(*COLD, "create", "x", "--exclude", "vda", says="no disk", id="exclude-every-disk"),
    case(*COLD, "create", "x", "--memory-file", "{d}/m.mem", says="--memory-file",
         id="memory-file-cold"),
    case(*COLD, "create", "x", "--live", says="--live", id="live-cold"),
    case(*LIVE, "create", "x", "--live", says="--live", id="live-internal-checkpoint"),
    case(*LIVE, "create", "x", "--disk-only", "--live", says="--live", id="live-disk-only"),
    case(*LIVE, "create", "x", "--disk-only", "--quiesce", says="--qga", id="quiesce-without-qga"),
    case(*COLD, "create", "x", "--quiesce", says="--quiesce", id="quiesce-cold"),
    case(*LIVE, "--qga", "{run}/qga.sock", "create", "x", "--quiesce", says="--quiesce",
         id="quiesce-with-memory"),
    case(*LIVE, "create", "x", "--internal", "--memory-file", "{d}/m.mem",
         id="internal-memory-file"),
    case(*COLD, "create", "x", "--disk-only", "--reuse-external", says="--overlay",
         id="reuse-external-without-overlay"),
    case(*COLD, "revert", "s1", "--running", "--paused", says="--paused",
         id="running-and-paused"),
    case(*COLD, "delete", "s1", "--children", "--children-only", says="--children-only",
         id="children-and-children-only"),
    case(*COLD, "check", "--repair", "bogus", says="bogus", id="repair-bogus"),
    case(*COLD, "list", "--tree", "--roots", says="--tree", id="tree-and-roots"),
    case(*COLD, "revert", "nope", says="nope", id="revert-unknown"),
    case(*COLD, "delete", "nope", says="nope", id="delete-unknown"),
    case(*COLD, "info", "nope", says="nope", id="info-unknown"),
    case(*COLD, "parent", "nope", says="nope", id="parent-unknown"),
    case(*LIVE, "chain", "nope", says="nope", id="chain-unknown-disk"),
    case(*COLD, "chain", "nope", says="nope", id="chain-unknown-disk-cold"),
    case(*LIVE, "revert", "s1", says="s1", id="revert-other-vms-snapshot"),
]  # fmt: skip
NOT_QEMU = [
    case("--qmp", "{d}/text.txt", "list", expect=(1, 2), says="text.txt", id="qmp-regular-file"),
    case("--qmp", "{d}/missing.sock", "list", expect=(1, 2), says="missing.sock",
         id="qmp-missing"),
    case("--qmp", "{d}/adir", "create", "x", expect=(1, 2), says="adir", id="qmp-directory"),
]  # fmt: skip


def _snapshots(state: Path) -> dict[int, list[str]]:
    with Store(state) as store:
        assert all(not store.journal(v.id) for v in store.vms())
        return {v.id: [s.name for s in store.snapshots(v.id)] for v in store.vms()}


def _records(state: Path) -> list[tuple[Any, ...]]:
    """Every row of the state directory's VM, disk and file tables, and the lock files of VMs
    it does not know (a known VM's lock file appears with its first operation)."""
    with Store(state) as store:
        db = store._db
        rows = [
            tuple(row)
            for table in ("vms", "disks", "files")
            for row in db.execute(f"SELECT * FROM {table} ORDER BY rowid")
        ]
        known = {f"vm-{v.id}.lock" for v in store.vms()}
    strays = sorted(p.name for p in (state / "locks").iterdir() if p.name not in known)
    return [*rows, *strays]


@pytest.mark.parametrize(("args", "expect", "says"), NAMES + PATHS + OPTIONS + NOT_QEMU)
def test_bad_input_is_refused_and_changes_nothing(
    lab: Lab, args: tuple[str, ...], expect: int | tuple[int, ...], says: str
) -> None:
    argv = [a.format(d=lab.d, run=lab.run, qmp=lab.qmp) for a in args]
    before, listed, records = tree_digest(lab.d), _snapshots(lab.state), _records(lab.state)
    done = cli(*argv, state=lab.state, expect=expect)
    assert says in done.stderr, done.stderr
    assert tree_digest(lab.d) == before
    # Not even a VM is recorded for a disk named for the first time (issue 11).
    assert _snapshots(lab.state) == listed
    assert _records(lab.state) == records


def test_cold_chain_of_a_named_disk(short_tmp: Path) -> None:
    """The positive twin of chain-unknown-disk-cold: ``--disk PATH chain [DISK]`` on a state
    directory that does not know the VM yet."""
    disk = short_tmp / "vda.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", disk, "8M")
    for args in (("chain",), ("chain", "vda")):
        state = short_tmp / f"state-{len(args)}"
        done = cli("--json", "--disk", disk, *args, state=state, expect=(0, 1, 2))
        assert done.returncode == 0, (args, done.stderr)


def test_relative_qmp_path_is_remembered(short_tmp: Path) -> None:
    """``--qmp`` relative to the working directory; the next command (elsewhere, no --qmp) still
    drives the running VM through the recorded socket."""
    disk = short_tmp / "vda.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", disk, "8M")
    state = short_tmp / "state"
    config = attrs.evolve(firmware_config([disk]), qmp_socket=str(short_tmp / "qmp.sock"))
    with ForeignVM(config, short_tmp / "qemu.log"):
        cli("--qmp", "qmp.sock", "list", state=state, cwd=short_tmp)
        done = cli("create", "e1", "--disk-only", state=state, cwd=Path("/"), expect=(0, 1, 2))
        assert done.returncode == 0, done.stderr


LONG_NAMES = [
    pytest.param("x" * 200, ("--disk-only",), id="200-ascii-external"),
    pytest.param("é" * 200, ("--disk-only",), id="200-two-byte-external"),
    pytest.param("é" * 200, ("--internal",), id="200-two-byte-internal-checkpoint"),
    pytest.param("🙂" * 200, ("--external",), id="200-emoji-external-checkpoint"),
]


@pytest.mark.parametrize(("name", "how"), LONG_NAMES)
def test_longest_valid_names_work(short_tmp: Path, name: str, how: tuple[str, ...]) -> None:
    """A name of 200 characters of any width is valid (SPEC section 3): every file named after
    it must fit in a file name (255 bytes)."""
    disk = short_tmp / "vda.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", disk, "8M")
    state = short_tmp / "state"
    config = attrs.evolve(firmware_config([disk]), qmp_socket=str(short_tmp / "qmp.sock"))
    with ForeignVM(config, short_tmp / "qemu.log") as vm:
        done = cli("--json", "--qmp", vm.qmp, "create", name, *how, state=state, expect=(0, 1))
        assert done.returncode == 0, done.stderr
        assert [s["name"] for s in cli_json("--qmp", vm.qmp, "list", state=state)] == [name]
