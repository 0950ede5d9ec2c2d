"""qemusnap.qemu_img against the real qemu-img/qemu-io (and a paused qemu-system for locks)."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from helpers import make_corrupt_image, make_leaky_image, qemu_holding, qemu_img, qemu_io

from qemusnap.errors import (
    DiskNotFoundError,
    ImageInUseError,
    OperationTimeout,
    QemuImgError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    TargetExistsError,
    UsageError,
)
from qemusnap.models import CheckOutcome
from qemusnap.qemu_img import QemuImg, QemuIo

pytestmark = pytest.mark.qemu_img

MiB = 1 << 20
SIZE = 4 * MiB
# Each layer writes its own byte at its own offset, so a read through the chain shows which
# layer every MiB comes from.
LAYERS = {"base": (0x11, 0), "mid": (0x22, MiB), "top": (0x33, 2 * MiB)}


@pytest.fixture
def img() -> QemuImg:
    return QemuImg(timeout=60)


@pytest.fixture
def io() -> QemuIo:
    return QemuIo(timeout=60)


@pytest_asyncio.fixture
async def chain(short_tmp: Path, img: QemuImg, io: QemuIo) -> dict[str, Path]:
    """base <- mid <- top, made with QemuImg.create, one pattern written into each layer."""
    paths = {name: short_tmp / f"{name}.qcow2" for name in LAYERS}

    async def build() -> None:
        await img.create(paths["base"], size=SIZE)
        await img.create(paths["mid"], backing=str(paths["base"]), backing_fmt="qcow2")
        await img.create(paths["top"], backing=str(paths["mid"]), backing_fmt="qcow2")
        for name, (pattern, offset) in LAYERS.items():
            await io.write_pattern(paths[name], pattern, offset, MiB, fmt="qcow2")

    await build()
    return paths


# --- info, chain, patterns ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_info_lists_the_chain_active_first(img: QemuImg, chain: dict[str, Path]) -> None:
    infos = await img.info(chain["top"])
    assert [i.filename for i in infos] == [str(chain[n]) for n in ("top", "mid", "base")]
    assert [i.backing_filename for i in infos] == [str(chain["mid"]), str(chain["base"]), None]
    assert [i.backing_format for i in infos] == ["qcow2", "qcow2", None]
    assert {i.format for i in infos} == {"qcow2"}
    assert {i.virtual_size for i in infos} == {SIZE}
    assert all(i.snapshots == () and not i.dirty for i in infos)

    only = await img.info(chain["top"], backing_chain=False)
    assert [i.filename for i in only] == [str(chain["top"])]

    c = await img.chain("vda", chain["top"])
    assert (c.disk, c.active.filename, c.base.filename) == (
        "vda",
        str(chain["top"]),
        str(chain["base"]),
    )
    assert c.to_json()["images"][0]["backing_filename"] == str(chain["mid"])


@pytest.mark.asyncio
async def test_relative_image_path_is_made_absolute(
    img: QemuImg, chain: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(chain["top"].parent)
    infos = await img.info("top.qcow2")
    assert infos[0].filename == str(chain["top"])


@pytest.mark.asyncio
async def test_patterns_read_back_through_the_chain(io: QemuIo, chain: dict[str, Path]) -> None:
    async def check() -> None:
        for pattern, offset in LAYERS.values():
            assert await io.verify_pattern(chain["top"], pattern, offset, MiB, fmt="qcow2")
        # Lower layers do not see what was written above them.
        assert await io.verify_pattern(chain["base"], 0x00, MiB, 2 * MiB, fmt="qcow2")
        assert await io.verify_pattern(chain["mid"], 0x00, 2 * MiB, MiB, fmt="qcow2")
        assert not await io.verify_pattern(chain["top"], 0x11, MiB, MiB, fmt="qcow2")
        # Overwrite in the active layer only.
        await io.write_pattern(chain["top"], 0x44, 0, 64 * 1024, fmt="qcow2")
        assert await io.verify_pattern(chain["top"], 0x44, 0, 64 * 1024, fmt="qcow2")
        assert await io.verify_pattern(chain["mid"], 0x11, 0, MiB, fmt="qcow2")

    await check()


@pytest.mark.asyncio
async def test_verify_pattern_raises_when_it_cannot_read(
    io: QemuIo, chain: dict[str, Path]
) -> None:
    # Past the end: qemu-io exits 1 as for a mismatch, but this is an error, not "False".
    with pytest.raises(QemuImgError, match="read failed"):
        await io.verify_pattern(chain["top"], 0, SIZE, MiB, fmt="qcow2")
    with pytest.raises(UsageError):
        await io.write_pattern(chain["top"], 0x100, 0, 512, fmt="qcow2")


# --- internal snapshots ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_internal_snapshots(img: QemuImg, io: QemuIo, chain: dict[str, Path]) -> None:
    top = chain["top"]

    async def scenario() -> None:
        await img.snapshot_create(top, "s1")
        await io.write_pattern(top, 0x55, 2 * MiB, MiB, fmt="qcow2")
        await img.snapshot_create(top, "s2")

        infos = await img.info(top)
        assert [s.name for s in infos[0].snapshots] == ["s1", "s2"]
        assert infos[1].snapshots == infos[2].snapshots == ()
        assert [s.name for s in await img.snapshot_list(top)] == ["s1", "s2"]
        assert all(s.vm_state_size == 0 and s.date_sec > 0 for s in infos[0].snapshots)

        with pytest.raises(SnapshotExistsError):
            await img.snapshot_create(top, "s1")

        await img.snapshot_apply(top, "s1")
        assert await io.verify_pattern(top, 0x33, 2 * MiB, MiB, fmt="qcow2")
        await img.snapshot_apply(top, "s2")
        assert await io.verify_pattern(top, 0x55, 2 * MiB, MiB, fmt="qcow2")

        await img.snapshot_delete(top, "s1")
        assert [s.name for s in await img.snapshot_list(top)] == ["s2"]
        with pytest.raises(SnapshotNotFoundError):
            await img.snapshot_apply(top, "s1")
        with pytest.raises(SnapshotNotFoundError):
            await img.snapshot_delete(top, "s1")

    await scenario()
    assert qemu_img("check", "-q", top) == ""


@pytest.mark.asyncio
async def test_snapshot_named_like_another_snapshots_id(
    img: QemuImg, io: QemuIo, short_tmp: Path
) -> None:
    """qemu-img snapshot -a looks up IDs before names; "2" must still mean the one named 2."""
    path = short_tmp / "ids.qcow2"

    async def scenario() -> None:
        await img.create(path, size=MiB)
        await io.write_pattern(path, 0x01, 0, 4096, fmt="qcow2")
        await img.snapshot_create(path, "2")  # gets ID 1
        await io.write_pattern(path, 0x02, 0, 4096, fmt="qcow2")
        await img.snapshot_create(path, "x")  # gets ID 2
        assert [(s.id, s.name) for s in await img.snapshot_list(path)] == [("1", "2"), ("2", "x")]
        await io.write_pattern(path, 0x03, 0, 4096, fmt="qcow2")

        await img.snapshot_apply(path, "2")
        assert await io.verify_pattern(path, 0x01, 0, 4096, fmt="qcow2")
        await img.snapshot_delete(path, "2")
        assert [s.name for s in await img.snapshot_list(path)] == ["x"]

    await scenario()


# --- check ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_check_clean_image(img: QemuImg, chain: dict[str, Path]) -> None:
    for path in chain.values():
        result = await img.check(path)
        assert result.result is CheckOutcome.OK and result.ok
        assert (result.leaks, result.corruptions, result.supported) == (0, 0, True)
        assert result.filename == str(path)


@pytest.mark.asyncio
async def test_check_finds_and_repairs_leaks(img: QemuImg, short_tmp: Path) -> None:
    path = short_tmp / "leaky.qcow2"
    make_leaky_image(path)

    found = await img.check(path)
    assert found.result is CheckOutcome.LEAKS
    assert (found.leaks, found.corruptions) == (1, 0)

    repaired = await img.check(path, repair="leaks")
    assert repaired.result is CheckOutcome.OK
    assert (repaired.leaks, repaired.leaks_fixed) == (0, 1)
    assert (await img.check(path)).result is CheckOutcome.OK


@pytest.mark.asyncio
async def test_check_finds_and_repairs_corruption(
    img: QemuImg, io: QemuIo, short_tmp: Path
) -> None:
    path = short_tmp / "corrupt.qcow2"
    make_corrupt_image(path)

    found = await img.check(path)
    assert found.result is CheckOutcome.CORRUPT
    assert found.corruptions > 0

    # qemu-img check -r leaks cannot rebuild refcounts: it fails (exit 1, no JSON).
    with pytest.raises(QemuImgError, match="Check failed"):
        await img.check(path, repair="leaks")

    repaired = await img.check(path, repair="all")
    assert repaired.result is CheckOutcome.OK
    assert repaired.corruptions_fixed > 0 and repaired.corruptions == 0
    assert (await img.check(path)).result is CheckOutcome.OK
    assert await io.verify_pattern(path, 0x5A, 0, 64 * 1024, fmt="qcow2")


@pytest.mark.asyncio
async def test_check_without_backing_sees_what_check_sees(img: QemuImg, short_tmp: Path) -> None:
    """An overlay checked alone (json: spec, "backing": null) reports the same leaks and
    corruptions as a check through its chain, repairs the same way, and does not open the
    backing file at all (it still checks once the backing file is gone)."""
    base = short_tmp / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    images = {"clean": short_tmp / "clean.qcow2"}
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", images["clean"])
    for outcome, make in (("leaks", make_leaky_image), ("corrupt", make_corrupt_image)):
        images[outcome] = short_tmp / f"{outcome}.qcow2"
        make(images[outcome])
        # rebase -u rewrites only the header: the broken metadata stays as it was.
        qemu_img("rebase", "-u", "-b", base, "-F", "qcow2", images[outcome])

    for outcome, path in images.items():
        alone = await img.check(path, fmt="qcow2", without_backing=True)
        through = await img.check(path)
        assert alone.result is CheckOutcome(outcome if outcome != "clean" else "ok")
        assert (alone.result, alone.leaks, alone.corruptions) == (
            through.result,
            through.leaks,
            through.corruptions,
        )
        assert alone.filename == str(path)
    assert (await img.check(images["leaks"], fmt="qcow2", without_backing=True)).leaks == 1

    fixed = await img.check(images["leaks"], repair="leaks", fmt="qcow2", without_backing=True)
    assert (fixed.result, fixed.leaks_fixed) == (CheckOutcome.OK, 1)
    fixed = await img.check(images["corrupt"], repair="all", fmt="qcow2", without_backing=True)
    assert fixed.result is CheckOutcome.OK and fixed.corruptions_fixed > 0
    # The repair kept the backing link (json: "backing": null only applies to this open).
    (top, below) = await img.info(images["corrupt"])
    assert (top.backing_filename, below.filename) == (str(base), str(base))

    base.unlink()
    with pytest.raises(DiskNotFoundError):
        await img.check(images["clean"])
    assert (await img.check(images["clean"], fmt="qcow2", without_backing=True)).ok
    with pytest.raises(UsageError, match="format"):
        await img.check(images["clean"], without_backing=True)


@pytest.mark.asyncio
async def test_check_raw_image_is_ok_but_unsupported(img: QemuImg, short_tmp: Path) -> None:
    path = short_tmp / "disk.raw"
    await img.create(path, fmt="raw", size=MiB)
    result = await img.check(path)
    assert (result.result, result.supported) == (CheckOutcome.OK, False)
    assert result.to_json()["result"] == "ok"
    assert (await img.info(path))[0].format == "raw"


# --- missing files, create ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_missing_image(img: QemuImg, io: QemuIo, short_tmp: Path) -> None:
    missing = short_tmp / "nope.qcow2"
    for coro in (
        img.info(missing),
        img.check(missing),
        img.snapshot_list(missing),
        img.image_in_use(missing),
        img.image_in_use(missing, for_write=True),
        io.verify_pattern(missing, 0, 0, 512, fmt="qcow2"),
    ):
        with pytest.raises(DiskNotFoundError, match=r"nope\.qcow2"):
            await coro


@pytest.mark.asyncio
async def test_missing_backing_file(img: QemuImg, short_tmp: Path, chain: dict[str, Path]) -> None:
    overlay = short_tmp / "overlay.qcow2"
    with pytest.raises(DiskNotFoundError, match=r"gone\.qcow2"):
        await img.create(overlay, backing=str(short_tmp / "gone.qcow2"), backing_fmt="qcow2")
    assert not overlay.exists()

    chain["mid"].rename(short_tmp / "moved.qcow2")
    with pytest.raises(DiskNotFoundError, match=r"mid\.qcow2"):
        await img.info(chain["top"])


@pytest.mark.asyncio
async def test_create_never_overwrites(img: QemuImg, short_tmp: Path) -> None:
    precious = short_tmp / "precious.qcow2"
    precious.write_bytes(b"do not touch")
    with pytest.raises(TargetExistsError):
        await img.create(precious, size=MiB)
    assert precious.read_bytes() == b"do not touch"

    link = short_tmp / "dangling.qcow2"
    link.symlink_to(short_tmp / "elsewhere")
    with pytest.raises(TargetExistsError):
        await img.create(link, size=MiB)
    assert not (short_tmp / "elsewhere").exists()


@pytest.mark.asyncio
async def test_overlays_are_made_without_opening_the_chain_below(
    img: QemuImg, short_tmp: Path, chain: dict[str, Path]
) -> None:
    """An overlay is created with ``-u`` and its backing file's size (qemu-img create -b would
    open the whole chain below): it must be the overlay qemu-img itself makes, over a qcow2,
    over a raw file of an odd size, through a relative name, and over an image a QEMU holds."""
    raw = short_tmp / "odd.raw"
    raw.write_bytes(b"\x5a" * (3 * MiB + 512))
    cases = [
        ("over-top.qcow2", str(chain["top"]), "qcow2"),
        ("over-raw.qcow2", str(raw), "raw"),
        ("over-relative.qcow2", "mid.qcow2", "qcow2"),
    ]
    for name, backing, fmt in cases:
        ours, theirs = short_tmp / name, short_tmp / f"reference-{name}"
        await img.create(ours, backing=backing, backing_fmt=fmt)
        qemu_img("create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, str(theirs))
        (mine,) = await img.info(ours, backing_chain=False)
        (reference,) = await img.info(theirs, backing_chain=False)
        assert (mine.virtual_size, mine.backing_format) == (
            reference.virtual_size,
            reference.backing_format,
        )
        assert mine.backing_filename == reference.backing_filename
        qemu_img("check", str(ours))
    # The image below reads through the new overlay exactly as before.
    io = QemuIo(timeout=60)
    assert await io.verify_pattern(short_tmp / "over-top.qcow2", 0x33, 2 * MiB, MiB, fmt="qcow2")
    assert await io.verify_pattern(short_tmp / "over-raw.qcow2", 0x5A, 3 * MiB, 512, fmt="qcow2")
    with qemu_holding(chain["top"], short_tmp / "qemu.log"):
        await img.create(short_tmp / "live.qcow2", backing=str(chain["top"]), backing_fmt="qcow2")
    assert (await img.info(short_tmp / "live.qcow2"))[0].virtual_size == SIZE
    # A missing backing file is still refused (-u alone would not check it).
    with pytest.raises(DiskNotFoundError):
        await img.create(short_tmp / "orphan.qcow2", backing=str(short_tmp / "nothing.qcow2"))
    assert not (short_tmp / "orphan.qcow2").exists()


@pytest.mark.asyncio
async def test_create_mode(img: QemuImg, short_tmp: Path) -> None:
    old = os.umask(0)  # the mode must not depend on the umask
    try:
        await img.create(short_tmp / "a.qcow2", size=MiB)
        await img.create(short_tmp / "b.qcow2", size=MiB, mode=0o640)
    finally:
        os.umask(old)
    assert stat.S_IMODE((short_tmp / "a.qcow2").stat().st_mode) == 0o600
    assert stat.S_IMODE((short_tmp / "b.qcow2").stat().st_mode) == 0o640
    assert (await img.info(short_tmp / "a.qcow2"))[0].virtual_size == MiB


@pytest.mark.asyncio
async def test_create_failure_removes_only_its_file(img: QemuImg, short_tmp: Path) -> None:
    path = short_tmp / "bad.qcow2"
    with pytest.raises(QemuImgError, match="create"):
        await img.create(path, size=MiB, options={"cluster_size": "3"})
    assert not path.exists()
    with pytest.raises(UsageError):
        await img.create(short_tmp / "no-dir" / "x.qcow2", size=MiB)


@pytest.fixture
def stuck_qemu_img(short_tmp: Path) -> Path:
    """A "qemu-img" that hangs, to interrupt create while it runs."""
    script = short_tmp / "qemu-img"
    script.write_text("#!/bin/sh\nexec sleep 30\n")
    script.chmod(0o755)
    return script


@pytest.mark.asyncio
async def test_create_timeout_removes_its_file(stuck_qemu_img: Path, short_tmp: Path) -> None:
    path = short_tmp / "slow.qcow2"
    with pytest.raises(OperationTimeout, match="qemu-img did not finish"):
        await QemuImg(str(stuck_qemu_img), timeout=0.3).create(path, size=MiB)
    assert not path.exists()


@pytest.mark.asyncio
async def test_create_cancelled_removes_its_file(stuck_qemu_img: Path, short_tmp: Path) -> None:
    path = short_tmp / "slow.qcow2"

    async def scenario() -> None:
        task = asyncio.create_task(QemuImg(str(stuck_qemu_img)).create(path, size=MiB))
        await asyncio.sleep(0.3)
        assert path.exists()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    await scenario()
    assert not path.exists()


# --- commit, rebase, measure ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_commit_and_rebase(img: QemuImg, io: QemuIo, chain: dict[str, Path]) -> None:
    base, mid, top = chain["base"], chain["mid"], chain["top"]

    async def scenario() -> None:
        await img.commit(top)  # top's data into mid, top emptied
        assert await io.verify_pattern(mid, 0x33, 2 * MiB, MiB, fmt="qcow2")
        assert await io.verify_pattern(top, 0x33, 2 * MiB, MiB, fmt="qcow2")

        await img.rebase(top, None)  # safe: top takes everything it showed and stands alone
        infos = await img.info(top)
        assert len(infos) == 1 and infos[0].backing_filename is None
        for pattern, offset in ((0x11, 0), (0x22, MiB), (0x33, 2 * MiB)):
            assert await io.verify_pattern(top, pattern, offset, MiB, fmt="qcow2")

        await img.rebase(top, str(base), "qcow2", unsafe=True)
        assert [i.filename for i in await img.info(top)] == [str(top), str(base)]

        await img.commit(mid, base=str(base))
        assert await io.verify_pattern(base, 0x22, MiB, MiB, fmt="qcow2")

    await scenario()


@pytest.mark.asyncio
async def test_measure(img: QemuImg, chain: dict[str, Path]) -> None:
    new = await img.measure(size=1 << 30)
    assert new.fully_allocated > 1 << 30 > new.required > 0
    copy = await img.measure(path=chain["top"], fmt="qcow2")
    assert copy.required > MiB  # top's one MiB of data plus metadata
    with pytest.raises(UsageError):
        await img.measure()


# --- qemu-io over NBD -----------------------------------------------------------------------


@pytest.fixture
def nbd_export(short_tmp: Path, chain: dict[str, Path]) -> Iterator[str]:
    if shutil.which("qemu-nbd") is None:
        pytest.skip("qemu-nbd not installed (qemu-utils)")
    sock = short_tmp / "nbd.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "-r", "-t", "-f", "qcow2", "-x", "vda", "-k", str(sock), str(chain["top"])],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        yield f"nbd+unix:///vda?socket={sock}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.asyncio
async def test_read_pattern_over_nbd(io: QemuIo, nbd_export: str) -> None:
    async def check() -> None:
        for pattern, offset in LAYERS.values():
            assert await io.read_pattern_nbd(nbd_export, pattern, offset, MiB)
        assert not await io.read_pattern_nbd(nbd_export, 0x77, 0, MiB)

    await check()


# --- an image a running QEMU holds ----------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.qemu_system
async def test_image_held_by_running_qemu(
    img: QemuImg, io: QemuIo, chain: dict[str, Path], short_tmp: Path
) -> None:
    top, mid, base = chain["top"], chain["mid"], chain["base"]
    spare = short_tmp / "spare.qcow2"
    await img.create(spare, size=MiB)

    with qemu_holding(top, short_tmp / "qemu.log"):

        async def scenario() -> None:
            assert await img.image_in_use(top)
            assert await img.image_in_use(top, for_write=True)
            # QEMU only reads the backing files: readers may open them, writers may not.
            assert not await img.image_in_use(base)
            assert await img.image_in_use(base, for_write=True)
            assert not await img.image_in_use(spare)
            assert not await img.image_in_use(spare, for_write=True)

            with pytest.raises(ImageInUseError, match=r"top\.qcow2 is in use by a running QEMU"):
                await img.info(top)
            infos = await img.info(top, force_share=True)
            assert [i.filename for i in infos] == [str(top), str(mid), str(base)]
            assert await img.snapshot_list(top, force_share=True) == []

            held = await img.check(top, force_share=True)
            assert (held.result, held.in_use) == (CheckOutcome.OK, True)
            with pytest.raises(UsageError, match="refusing to repair"):
                await img.check(top, repair="leaks", force_share=True)

            writes = [
                img.check(top, repair="leaks"),
                img.snapshot_create(top, "s1"),
                img.snapshot_create(base, "s1"),
                img.commit(top),
                img.rebase(top, None, unsafe=True),
                img.rebase(mid, None, unsafe=True),
                io.write_pattern(top, 0x66, 0, 512, fmt="qcow2"),
            ]
            for coro in writes:
                with pytest.raises(ImageInUseError, match="in use by a running QEMU"):
                    await coro

            assert await io.verify_pattern(top, 0x33, 2 * MiB, MiB, fmt="qcow2", force_share=True)
            with pytest.raises(ImageInUseError):
                await io.verify_pattern(top, 0x33, 2 * MiB, MiB, fmt="qcow2")

            # An overlay on top of an image in use may be prepared (external snapshots do).
            await img.create(short_tmp / "overlay.qcow2", backing=str(top), backing_fmt="qcow2")

        await scenario()

    # Nothing was written while QEMU held the chain.
    assert qemu_img("check", "-q", top) == ""
    assert "s1" not in qemu_img("snapshot", "-l", base)
    qemu_io(top, "read -P 0x33 2M 1M")
