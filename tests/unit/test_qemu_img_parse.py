"""qemu-img's JSON and error messages into qemusnap's models and errors (no binary needed).

The JSON and stderr texts were recorded from qemu-img 7.2 (Debian bookworm).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qemusnap.errors import (
    DiskNotFoundError,
    ImageInUseError,
    QemuImgError,
    UnsupportedError,
    UsageError,
)
from qemusnap.models import CheckOutcome
from qemusnap.process import Completed
from qemusnap.qemu_img import QemuImg, _error, parse_check, parse_info

# qemu-img info --backing-chain --output=json /t/top.qcow2   (base has internal snapshot "s1")
INFO_CHAIN = """
[
    {
        "backing-filename-format": "qcow2",
        "virtual-size": 1048576,
        "filename": "/t/top.qcow2",
        "cluster-size": 65536,
        "format": "qcow2",
        "actual-size": 200704,
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
            "compression-type": "zlib", "lazy-refcounts": false, "refcount-bits": 16,
            "corrupt": false, "extended-l2": false}},
        "full-backing-filename": "/t/mid.qcow2",
        "backing-filename": "/t/mid.qcow2",
        "dirty-flag": false
    },
    {
        "backing-filename-format": "qcow2",
        "virtual-size": 1048576,
        "filename": "/t/mid.qcow2",
        "cluster-size": 65536,
        "format": "qcow2",
        "actual-size": 200704,
        "full-backing-filename": "/t/base.qcow2",
        "backing-filename": "base.qcow2",
        "dirty-flag": false
    },
    {
        "snapshots": [
            {
                "icount": 0,
                "vm-clock-nsec": 250000000,
                "name": "s1",
                "date-sec": 1795791837,
                "date-nsec": 245243000,
                "vm-clock-sec": 3,
                "id": "1",
                "vm-state-size": 4096
            }
        ],
        "virtual-size": 1048576,
        "filename": "/t/base.qcow2",
        "cluster-size": 65536,
        "format": "qcow2",
        "actual-size": 208896,
        "dirty-flag": false
    }
]
"""

# qemu-img info --output=json /t/disk.raw  (no --backing-chain: one object, not a list)
INFO_RAW = """
{
    "virtual-size": 1048576,
    "filename": "/t/disk.raw",
    "format": "raw",
    "actual-size": 4096,
    "dirty-flag": false
}
"""

CHECK_CLEAN = """{"image-end-offset": 262144, "total-clusters": 16, "check-errors": 0,
    "filename": "/t/top.qcow2", "format": "qcow2"}"""
CHECK_LEAKS = """{"image-end-offset": 393216, "total-clusters": 16, "check-errors": 0,
    "leaks": 1, "filename": "/t/leak.qcow2", "format": "qcow2"}"""
CHECK_CORRUPT = """{"image-end-offset": 393216, "total-clusters": 16, "corruptions": 2,
    "check-errors": 0, "allocated-clusters": 1, "filename": "/t/corrupt.qcow2",
    "format": "qcow2"}"""
# check -r leaks: the JSON describes the image after the repair
CHECK_LEAKS_FIXED = """{"image-end-offset": 327680, "total-clusters": 16, "check-errors": 0,
    "leaks-fixed": 1, "filename": "/t/leak.qcow2", "format": "qcow2"}"""
CHECK_CORRUPTIONS_FIXED = """{"image-end-offset": 524288, "total-clusters": 16,
    "corruptions-fixed": 1, "check-errors": 0, "allocated-clusters": 1,
    "filename": "/t/corrupt.qcow2", "format": "qcow2"}"""


def test_info_backing_chain() -> None:
    top, mid, base = parse_info(INFO_CHAIN)
    assert (top.filename, mid.filename, base.filename) == (
        "/t/top.qcow2",
        "/t/mid.qcow2",
        "/t/base.qcow2",
    )
    # full-backing-filename wins over the name as written in the header ("base.qcow2")
    assert (top.backing_filename, mid.backing_filename, base.backing_filename) == (
        "/t/mid.qcow2",
        "/t/base.qcow2",
        None,
    )
    assert (top.backing_format, base.backing_format) == ("qcow2", None)
    assert top.format == "qcow2" and top.virtual_size == 1048576 and top.actual_size == 200704
    assert top.snapshots == mid.snapshots == ()
    (snap,) = base.snapshots
    assert (snap.id, snap.name, snap.vm_state_size, snap.date_sec) == ("1", "s1", 4096, 1795791837)
    assert snap.vm_clock_nsec == 3_250_000_000
    assert base.to_json()["snapshots"][0]["name"] == "s1"


def test_info_single_image() -> None:
    (raw,) = parse_info(INFO_RAW)
    assert (raw.filename, raw.format, raw.backing_filename, raw.snapshots) == (
        "/t/disk.raw",
        "raw",
        None,
        (),
    )


@pytest.mark.parametrize("text", ["", "qemu-img: oops", "[{}]", '{"filename": "x"}'])
def test_info_garbage(text: str) -> None:
    with pytest.raises(QemuImgError):
        parse_info(text)


@pytest.mark.parametrize(
    ("text", "code", "outcome", "counts"),
    [
        (CHECK_CLEAN, 0, CheckOutcome.OK, (0, 0, 0, 0)),
        (CHECK_LEAKS, 3, CheckOutcome.LEAKS, (1, 0, 0, 0)),
        (CHECK_CORRUPT, 2, CheckOutcome.CORRUPT, (0, 2, 0, 0)),
        (CHECK_LEAKS_FIXED, 0, CheckOutcome.OK, (0, 0, 1, 0)),
        (CHECK_CORRUPTIONS_FIXED, 0, CheckOutcome.OK, (0, 0, 0, 1)),
    ],
)
def test_check(
    text: str, code: int, outcome: CheckOutcome, counts: tuple[int, int, int, int]
) -> None:
    result = parse_check(text, code, filename="/fallback")
    assert result.result is outcome
    assert (result.leaks, result.corruptions, result.leaks_fixed, result.corruptions_fixed) == (
        counts
    )
    assert result.filename == json.loads(text)["filename"]
    assert result.supported and not result.in_use
    assert result.to_json()["result"] == str(outcome)


def test_check_exit_code_wins_over_missing_counts() -> None:
    assert parse_check("{}", 2, filename="/x").result is CheckOutcome.CORRUPT
    assert parse_check("{}", 3, filename="/x").result is CheckOutcome.LEAKS
    assert parse_check("{}", 0, filename="/x", in_use=True).in_use


# --- stderr -> errors -----------------------------------------------------------------------


def done(
    stderr: str, argv: tuple[str, ...] = ("/usr/bin/qemu-img", "info"), rc: int = 1
) -> Completed:
    return Completed(argv=argv, returncode=rc, stdout="", stderr=stderr)


def test_write_lock_is_image_in_use() -> None:
    err = _error(
        done(
            "qemu-img: Could not open '/t/top.qcow2': Failed to get \"write\" lock\n"
            "Is another process using the image [/t/top.qcow2]?\n",
            ("/usr/bin/qemu-img", "snapshot", "-c", "s1", "/t/top.qcow2"),
        ),
        "/t/top.qcow2",
    )
    assert isinstance(err, ImageInUseError)
    assert str(err).startswith("image /t/top.qcow2 is in use by a running QEMU")
    assert err.argv == ["/usr/bin/qemu-img", "snapshot", "-c", "s1", "/t/top.qcow2"]


def test_shared_lock_names_the_locked_image() -> None:
    # qemu-io and a backing file: the name in brackets is the one that is locked
    err = _error(
        done(
            'qemu-io: can\'t open device /t/top.qcow2: Failed to get shared "write" lock\n'
            "Is another process using the image [/t/mid.qcow2]?\n",
            ("qemu-io", "-r", "/t/top.qcow2"),
        ),
        "/t/top.qcow2",
    )
    assert isinstance(err, ImageInUseError)
    assert "/t/mid.qcow2 is in use" in str(err)


@pytest.mark.parametrize(
    ("stderr", "missing"),
    [
        (
            "qemu-img: Could not open '/t/nope.qcow2': Could not open '/t/nope.qcow2': "
            "No such file or directory\n",
            "/t/nope.qcow2",
        ),
        (
            "qemu-img: Could not open '/t/top.qcow2': Could not open backing file: "
            "Could not open '/t/mid.qcow2': No such file or directory\n",
            "/t/mid.qcow2",
        ),
        (
            "qemu-img: /t/new.qcow2: Could not open '/t/gone': No such file or directory\n"
            "Could not open backing image.\n",
            "/t/gone",
        ),
    ],
)
def test_missing_file(stderr: str, missing: str) -> None:
    err = _error(done(stderr), "/t/top.qcow2")
    assert isinstance(err, DiskNotFoundError)
    assert str(err) == f"no such image file: {missing}"


def test_other_failure_keeps_the_error_line_and_argv() -> None:
    argv = ("/usr/bin/qemu-img", "check", "--output=json", "-r", "leaks", "/t/c.qcow2")
    err = _error(
        done(
            "ERROR cluster 5 refcount=0 reference=1\n"
            "ERROR need to rebuild refcount structures\n"
            "qemu-img: Check failed: Input/output error\n",
            argv,
        ),
        "/t/c.qcow2",
    )
    assert type(err) is QemuImgError
    assert str(err) == "qemu-img check failed on /t/c.qcow2: Check failed: Input/output error"
    assert err.argv == list(argv) and "refcount=0" in err.stderr


def test_unsupported_operation() -> None:
    err = _error(
        done(
            "qemu-img: Could not create snapshot 'x': -95 (Operation not supported)\n",
            ("qemu-img", "snapshot", "-c", "x", "/t/d.raw"),
        ),
        "/t/d.raw",
    )
    assert isinstance(err, UnsupportedError)


def test_qemu_io_failure_on_stdout() -> None:
    failed = Completed(
        argv=("qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x01 4M 512", "/t/b.qcow2"),
        returncode=1,
        stdout="read failed: Input/output error\n",
        stderr="",
    )
    assert str(_error(failed, "/t/b.qcow2")) == (
        "qemu-io failed on /t/b.qcow2: read failed: Input/output error"
    )


# --- argv (a fake qemu-img that records how it was called) ----------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> tuple[QemuImg, Path]:
    log = tmp_path / "argv"
    script = tmp_path / "qemu-img"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$*" >> {log}\n'
        'case "$1" in\n'
        '  info) echo \'{"filename": "/t/x", "format": "qcow2", "virtual-size": 1,'
        ' "snapshots": [{"id": "1", "name": "2"}, {"id": "2", "name": "x"}]}\' ;;\n'
        '  check) echo \'{"filename": "/t/x"}\' ;;\n'
        "esac\n"
    )
    script.chmod(0o755)
    return QemuImg(str(script), timeout=10), log


@pytest.mark.asyncio
async def test_argv(fake: tuple[QemuImg, Path]) -> None:
    img, log = fake
    await img.info("/t/x", force_share=True, fmt="qcow2")
    await img.check("/t/x", repair="all")
    await img.snapshot_apply("/t/x", "2")
    await img.snapshot_delete("/t/x", "2")
    await img.rebase("/t/x", None, unsafe=True)
    await img.commit("/t/x", base="/t/b", keep_top=True)
    assert log.read_text().splitlines() == [
        "info --output=json -f qcow2 --backing-chain -U /t/x",
        "check --output=json -r all /t/x",
        "info --output=json /t/x",
        "snapshot -a 1 /t/x",  # the ID: -a would take "2" as snapshot ID 2 ("x")
        "info --output=json /t/x",
        "snapshot -d 2 /t/x",  # -d looks up names only
        "rebase -u -b  /t/x",
        "commit -b /t/b -d /t/x",
    ]


@pytest.mark.asyncio
async def test_repair_with_force_share_is_refused_before_running(
    fake: tuple[QemuImg, Path],
) -> None:
    img, log = fake
    with pytest.raises(UsageError, match="refusing to repair"):
        await img.check("/t/x", repair="leaks", force_share=True)
    assert not log.exists()
