"""Scale (issue 16): long histories and deep chains through the CLI, and what each operation
asks qemu-img.

The histories are built through the Python API in this process (the same engine the CLI
calls): measured on the project machine (2 cores, TCG, shared with other work), a ``qemusnap
create`` through the CLI costs about 0.5 s, most of it Python starting, so 300 + 128 of them
would take 3.5 minutes by themselves.  Everything then checked is checked through the CLI.

qemu-img is wrapped (``QEMUSNAP_QEMU_IMG``) by a script that logs every argv, so a test can
count the ``qemu-img info`` runs of one CLI call and see how ``check`` opens each image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import make_snapshot, qemu_img, qemu_io

from qemusnap import VM
from qemusnap.models import DiskSnapshot, DiskSnapshotKind

pytestmark = pytest.mark.qemu_img

HISTORY = 300
DEPTH = 128
OFFSET = "1M"


class Cli:
    """``python -m qemusnap`` on one state directory, with qemu-img's argv logged."""

    def __init__(self, tmp: Path, state: Path) -> None:
        self.state = state
        self.log = tmp / "qemu-img.log"
        wrapper = tmp / "qemu-img-logged"
        wrapper.write_text(f'#!/bin/sh\necho "$*" >> {self.log}\nexec qemu-img "$@"\n')
        wrapper.chmod(0o755)
        self.env = {**os.environ, "QEMUSNAP_QEMU_IMG": str(wrapper)}

    def __call__(self, *args: str | Path, expect: int = 0) -> subprocess.CompletedProcess[str]:
        self.log.write_text("")
        done = subprocess.run(
            [sys.executable, "-m", "qemusnap", "--state", str(self.state), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        assert done.returncode == expect, f"{args}: {done.returncode}\n{done.stdout}{done.stderr}"
        return done

    def json(self, *args: str | Path) -> object:
        return json.loads(self(*args, "--json").stdout)

    def ran(self, sub: str) -> list[str]:
        """The qemu-img runs of subcommand *sub* the last call made."""
        return [line for line in self.log.read_text().splitlines() if line.split()[:1] == [sub]]


def pattern(image: Path, byte: int) -> None:
    qemu_io(image, f"write -P {byte:#04x} {OFFSET} 64k")


def reads(image: Path, byte: int) -> bool:
    done = subprocess.run(
        ["qemu-io", "-r", "-f", "qcow2", "-c", f"read -P {byte:#04x} {OFFSET} 64k", str(image)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "Pattern verification failed" in done.stdout:
        return False
    assert done.returncode == 0 and "read 65536/65536 bytes" in done.stdout, done.stdout
    return True


async def build(
    disk: Path, state: Path, names: list[str], marks: dict[str, int], **kw: bool
) -> None:
    """Snapshots *names* in a line; before snapshot N, *marks*[N] is written into the disk."""
    vm = await VM.cold([str(disk)], state_dir=state)
    async with vm:
        for name in names:
            if name in marks:
                (active,) = [d.file for d in await vm.disks()]
                pattern(Path(active), marks[name])
            await vm.create(name, **kw)


def tree_names(text: str) -> list[str]:
    return [row.lstrip("│├└─… ").split()[0] for row in text.splitlines() if row]


@pytest.mark.asyncio
async def test_300_internal_snapshots(short_tmp: Path) -> None:
    disk = short_tmp / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, "16M")
    state = short_tmp / "state"
    names = [f"s{i}" for i in range(HISTORY)]
    marks = {"s0": 0x10, "s150": 0x15, "s299": 0x29}
    await build(disk, state, names, marks)
    cli = Cli(short_tmp, state)

    # list --tree: one line per snapshot, a line of them drawn as one column.
    text = cli("--disk", disk, "list", "--tree").stdout
    assert tree_names(text) == names
    assert all(row.startswith("s") for row in text.splitlines())
    assert len(cli.json("list")) == HISTORY  # type: ignore[arg-type]

    # The history was made by qemusnap: the store knows the image's snapshot table.  A
    # write qemusnap did not make (qemu-io here) changes the image's stat: the next
    # operation asks qemu-img info once; after that, the image changes only by qemusnap's own
    # commands, and create/revert/delete ask it nothing.
    cli("--disk", disk, "revert", "s1")
    assert cli.ran("info") == [], cli.ran("info")
    pattern(disk, 0x99)
    cli("--disk", disk, "revert", "s150")
    assert len(cli.ran("info")) == 1, cli.ran("info")
    assert reads(disk, 0x15)
    cli("--disk", disk, "create", "after")
    assert cli.ran("info") == []
    cli("--disk", disk, "revert", "s299")
    assert cli.ran("info") == []
    assert reads(disk, 0x29)

    # delete in the middle: its child moves to its parent; the others keep their data.
    cli("--disk", disk, "delete", "s150")
    assert cli.ran("info") == []
    (s151,) = [s for s in cli.json("list") if s["name"] == "s151"]  # type: ignore[union-attr,attr-defined]
    assert s151["parent"] == "s149"
    # delete --children of a long branch: 150 snapshots, children before parents.
    cli("--disk", disk, "delete", "s200", "--children")
    left = [s["name"] for s in cli.json("list")]  # type: ignore[union-attr]
    # ("after", taken when s150 was current, moved to s149 with s151.)
    assert left == [*(n for n in names if n != "s150" and int(n[1:]) < 200), "after"]
    internal = json.loads(qemu_img("info", "--output=json", disk))["snapshots"]
    assert [t["name"] for t in internal] == left
    cli("--disk", disk, "revert", "s0")
    assert reads(disk, 0x10)

    results = cli.json("check")
    assert [r["result"] for r in results] == ["ok"]  # type: ignore[union-attr,index]


@pytest.mark.asyncio
async def test_128_deep_chain(short_tmp: Path) -> None:
    base = short_tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "16M")
    state = short_tmp / "state"
    names = [f"e{i}" for i in range(DEPTH)]
    marks = {"e0": 0x10, "e32": 0x32, "e64": 0x64, "e100": 0x71, "e127": 0x7F}
    await build(base, state, names, marks, disk_only=True)
    cli = Cli(short_tmp, state)

    text = cli("--disk", base, "list", "--tree").stdout
    assert tree_names(text) == names
    chain = cli.json("chain")
    images = chain[0]["images"]  # type: ignore[index]
    assert len(images) == DEPTH + 1 and images[-1]["filename"] == str(base)

    # check opens each image once: every image with a backing file is checked alone.
    began = time.perf_counter()
    results = cli.json("check")
    took = time.perf_counter() - began
    assert len(results) == DEPTH + 1  # type: ignore[arg-type]
    assert {r["result"] for r in results} == {"ok"}  # type: ignore[union-attr,index]
    checks = cli.ran("check")
    assert len(checks) == DEPTH + 1
    assert sum('"backing": null' in c for c in checks) == DEPTH
    assert took < 60, f"check of a {DEPTH + 1}-image chain took {took:.1f} s"

    # revert deep in the chain: a new overlay on e64's image, reading what was there.
    cli("--disk", base, "revert", "e64")
    (active,) = [Path(d["file"]) for d in cli.json("info", "e64")["disks"]]  # type: ignore[index]
    current = Path(cli.json("chain")[0]["images"][0]["filename"])  # type: ignore[index]
    assert current != active and reads(current, 0x64)
    # ... asking qemu-img info about the new overlay only: the chain below is known.
    cli("--disk", base, "create", "--disk-only", "branch")
    assert len(cli.ran("info")) <= 1, cli.ran("info")

    # delete in the middle of the chain (merged away): the snapshots above keep their data.
    cli("--disk", base, "delete", "e32")
    assert "e32" not in [s["name"] for s in cli.json("list")]  # type: ignore[union-attr]
    cli("--disk", base, "revert", "e100")
    current = Path(cli.json("chain")[0]["images"][0]["filename"])  # type: ignore[index]
    assert reads(current, 0x71)
    cli("--disk", base, "revert", "e33")
    current = Path(cli.json("chain")[0]["images"][0]["filename"])  # type: ignore[index]
    assert reads(current, 0x32)
    assert {r["result"] for r in cli.json("check")} == {"ok"}  # type: ignore[union-attr,index]


def test_the_cache_sees_what_others_did_to_an_image(short_tmp: Path) -> None:
    """Changes qemusnap did not make (another qemu-img) are seen: the image's stat changed."""
    disk = short_tmp / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, "16M")
    cli = Cli(short_tmp, short_tmp / "state")
    cli("--disk", disk, "create", "a")
    cli("--disk", disk, "create", "b")
    qemu_img("snapshot", "-c", "theirs", disk)
    done = cli("--disk", disk, "create", "theirs", expect=2)
    assert "theirs" in done.stderr
    assert len(cli.ran("info")) == 1
    qemu_img("snapshot", "-d", "b", disk)
    cli("--disk", disk, "revert", "b", expect=2)
    names = [t["name"] for t in json.loads(qemu_img("info", "--output=json", disk))["snapshots"]]
    assert names == ["a", "theirs"]


def test_a_numeric_name_is_never_taken_for_an_id(short_tmp: Path) -> None:
    """``qemu-img snapshot -a`` looks IDs up first: snapshot "1" is not the one with ID 1,
    even when the store has not read the IDs QEMU gave them."""
    disk = short_tmp / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, "16M")
    cli = Cli(short_tmp, short_tmp / "state")
    pattern(disk, 0x11)
    cli("--disk", disk, "create", "a")  # ID 1
    pattern(disk, 0x22)
    cli("--disk", disk, "create", "1")  # ID 2
    pattern(disk, 0x33)
    cli("--disk", disk, "revert", "1")
    assert reads(disk, 0x22)
    cli("--disk", disk, "revert", "a")
    assert reads(disk, 0x11)
    assert [r["result"] for r in cli.json("check")] == ["ok"]  # type: ignore[union-attr,index]


@pytest.mark.asyncio
async def test_a_tree_10000_deep_lists_reverts_and_deletes(short_tmp: Path) -> None:
    """The store holds a line of 10,000 snapshots (written directly: taking them would take
    an hour); three of them also exist in the image.  The CLI lists, renders, reverts and
    deletes in that tree: nothing in the engine recurses or rescans per snapshot."""
    disk = short_tmp / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", disk, "16M")
    state = short_tmp / "state"
    depth = 10_000
    real = {"s0": 0x10, "s5000": 0x50, f"s{depth - 1}": 0x99}

    vm = await VM.cold([str(disk)], state_dir=state)
    async with vm:
        with vm.store.atomic():
            for i in range(depth):
                name = f"s{i}"
                if name in real:
                    pattern(disk, real[name])
                    qemu_img("snapshot", "-c", name, disk)
                vm.store.add_snapshot(
                    vm.record.id,
                    make_snapshot(
                        name,
                        f"s{i - 1}" if i else None,
                        disks=(DiskSnapshot("disk", DiskSnapshotKind.INTERNAL, str(disk)),),
                    ),
                )
    cli = Cli(short_tmp, state)
    began = time.perf_counter()
    text = cli("--disk", disk, "list", "--tree").stdout
    assert tree_names(text) == [f"s{i}" for i in range(depth)]
    assert len(text) < 60 * depth  # one column: linear, not 200 MB of indentation
    assert cli.json("parent", "s5000")["name"] == "s4999"  # type: ignore[index]

    pattern(disk, 0x77)
    cli("--disk", disk, "revert", "s5000")
    assert reads(disk, 0x50)
    cli("--disk", disk, "delete", "s5000")
    assert cli.json("info", "s5001")["parent"] == "s4999"  # type: ignore[index]
    # --children of a 5,000-deep branch, metadata only (those tags are not in the image).
    removed = cli.json("delete", "s5001", "--children", "--metadata-only")
    assert len(removed["deleted"]) == depth - 5001  # type: ignore[index,call-overload]
    assert len(cli.json("list")) == 5000  # type: ignore[arg-type]
    cli("--disk", disk, "revert", "s0")
    assert reads(disk, 0x10)
    assert time.perf_counter() - began < 120
    tags = [t["name"] for t in json.loads(qemu_img("info", "--output=json", disk))["snapshots"]]
    assert tags == ["s0", f"s{depth - 1}"]
