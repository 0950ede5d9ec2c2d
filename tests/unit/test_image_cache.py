"""QemuImg's image cache (issue 16) against a stand-in qemu-img that logs its runs.

The stand-in answers ``info`` from JSON files beside the images, so these tests need no QEMU;
tests/integration/test_scale.py runs the same paths against the real qemu-img.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from qemusnap.qemu_img import QemuImg, stat_key
from qemusnap.store import Store

FAKE = r"""#!/usr/bin/env python3
import json, sys
args = sys.argv[1:]
with open(LOG, "a") as log:
    log.write(" ".join(args) + "\n")
path = args[-1]
chain = "--backing-chain" in args
items = []
while path:
    with open(path + ".info") as f:
        item = json.load(f)
    items.append(item)
    path = item.get("full-backing-filename") if chain else None
print(json.dumps(items if chain else items[0]))
"""


def image(path: Path, backing: Path | None = None, tags: tuple[str, ...] = ()) -> Path:
    path.write_bytes(b"QFI\xfb")
    item: dict[str, object] = {"filename": str(path), "format": "qcow2", "virtual-size": 1 << 20}
    if backing is not None:
        item["full-backing-filename"] = str(backing)
        item["backing-filename-format"] = "qcow2"
    item["snapshots"] = [
        {"id": str(i + 1), "name": name, "vm-state-size": 0} for i, name in enumerate(tags)
    ]
    Path(f"{path}.info").write_text(json.dumps(item))
    return path


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def img(tmp: Path) -> Iterator[tuple[QemuImg, Path]]:
    log = tmp / "runs.log"
    fake = tmp / "qemu-img"
    fake.write_text(FAKE.replace("LOG", repr(str(log))))
    fake.chmod(0o755)
    with Store(tmp / "state") as store:  # closed: Python 3.13 warns of a collected connection
        yield QemuImg(str(fake), cache=store), log


def runs(log: Path) -> list[str]:
    text = log.read_text() if log.exists() else ""
    log.write_text("")
    return text.splitlines()


@pytest.mark.asyncio
async def test_an_unchanged_image_is_asked_once(tmp: Path, img: tuple[QemuImg, Path]) -> None:
    qemu_img, log = img
    disk = image(tmp / "d.qcow2", tags=("a", "b"))
    first = await qemu_img.info(disk, backing_chain=False)
    assert len(runs(log)) == 1
    again = await qemu_img.info(disk, backing_chain=False)
    assert again == first and runs(log) == []
    assert [t.name for t in await qemu_img.tags(disk)] == ["a", "b"]
    assert runs(log) == []
    # Any change of the file (here its mtime) means: ask again.
    st = disk.stat()
    os.utime(disk, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    await qemu_img.info(disk, backing_chain=False)
    assert len(runs(log)) == 1


@pytest.mark.asyncio
async def test_a_chain_asks_only_for_what_changed(tmp: Path, img: tuple[QemuImg, Path]) -> None:
    qemu_img, log = img
    files = [image(tmp / "i0.qcow2")]
    for i in range(1, 6):
        files.append(image(tmp / f"i{i}.qcow2", files[-1]))
    chain = await qemu_img.info(files[-1])
    assert [i.filename for i in chain] == [str(f) for f in reversed(files)]
    # Cold: the top alone, then the rest of the chain in one run.
    assert [r.split()[-1] for r in runs(log)] == [str(files[5]), str(files[4])]
    assert await qemu_img.info(files[-1]) == chain and runs(log) == []
    top = image(tmp / "new.qcow2", files[-1])  # a snapshot: a new overlay on top
    assert len(await qemu_img.info(top)) == 7
    assert [r.split()[-1] for r in runs(log)] == [str(top)]


def test_block_devices_are_never_cached() -> None:
    assert stat_key("/dev/null") is None
    assert stat_key("/nonexistent/x") is None
