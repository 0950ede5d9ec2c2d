"""Test helpers that make broken or busy images on purpose.

They use the qemu-img/qemu-io binaries directly (not qemusnap's wrappers), so they stay an
independent oracle. Import with ``from helpers import ...`` (tests/ is on sys.path through
tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from qemusnap.models import (
    Consistency,
    DiskSnapshot,
    DiskSnapshotKind,
    MemoryKind,
    Snapshot,
    SnapshotKind,
    VMState,
)

# Offset fields of the qcow2 header (big-endian), docs/interop/qcow2.txt.
_CLUSTER_BITS = 20  # u32
_L1_TABLE_OFFSET = 40  # u64
_REFCOUNT_TABLE_OFFSET = 48  # u64
_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00  # host offset bits of L1/L2/refcount-table entries


def qemu_img(*args: str | Path) -> str:
    """Run qemu-img, return its stdout; fail loudly."""
    done = subprocess.run(
        ["qemu-img", *map(str, args)], capture_output=True, text=True, check=False, timeout=60
    )
    if done.returncode != 0:
        raise AssertionError(f"qemu-img {args} exited {done.returncode}: {done.stderr}")
    return done.stdout


def qemu_io(image: str | Path, *commands: str, fmt: str = "qcow2") -> str:
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    done = subprocess.run([*argv, str(image)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0 or "failed" in done.stdout:
        raise AssertionError(f"qemu-io {commands} failed: {done.stdout}{done.stderr}")
    return done.stdout


def _first_data_cluster(f: BinaryIO) -> tuple[int, int, int, int]:
    """(cluster_bits, refcount table offset, L2 entry offset, data cluster offset) of guest
    cluster 0 of an open qcow2 file."""

    def u(fmt: str, at: int) -> int:
        f.seek(at)
        return int(struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0])

    cluster_bits = u(">I", _CLUSTER_BITS)
    refcount_table = u(">Q", _REFCOUNT_TABLE_OFFSET)
    l2_table = u(">Q", u(">Q", _L1_TABLE_OFFSET)) & _OFFSET_MASK
    data = u(">Q", l2_table) & _OFFSET_MASK
    assert l2_table and data, "guest cluster 0 is not allocated"
    return cluster_bits, refcount_table, l2_table, data


def make_leaky_image(path: str | Path, *, size: str = "1M") -> None:
    """A qcow2 with exactly one leaked cluster (``qemu-img check`` exits 3, leaks=1).

    Guest cluster 0 is written, then its L2 entry is zeroed: the data cluster keeps refcount 1
    but nothing references it any more. Guest data reads as zeroes; nothing else is wrong.
    """
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    qemu_io(path, "write -P 0x5a 0 64k")
    with open(path, "r+b") as f:
        _, _, l2_entry, _ = _first_data_cluster(f)
        f.seek(l2_entry)
        f.write(bytes(8))


def make_corrupt_image(path: str | Path, *, size: str = "1M") -> None:
    """A qcow2 with a corruption (``qemu-img check`` exits 2, corruptions=2).

    Guest cluster 0 is written, then the refcount of its data cluster is set to 0 while its L2
    entry still points at it: "refcount=0 reference=1" plus the then-wrong OFLAG_COPIED flag.
    ``check -r all`` repairs it (rebuilding the refcounts); ``-r leaks`` cannot.
    """
    qemu_img("create", "-q", "-f", "qcow2", path, size)
    qemu_io(path, "write -P 0x5a 0 64k")
    with open(path, "r+b") as f:
        cluster_bits, refcount_table, _, data = _first_data_cluster(f)
        index = data >> cluster_bits
        per_block = (1 << cluster_bits) // 2  # refcount_bits=16, the default
        f.seek(refcount_table + 8 * (index // per_block))
        (block,) = struct.unpack(">Q", f.read(8))
        f.seek((block & _OFFSET_MASK) + 2 * (index % per_block))
        f.write(bytes(2))


def _locked(image: Path) -> bool:
    done = subprocess.run(
        ["qemu-img", "info", str(image)], capture_output=True, text=True, timeout=30
    )
    return "lock" in done.stderr


@contextlib.contextmanager
def qemu_holding(image: str | Path, log: str | Path, *, fmt: str = "qcow2") -> Iterator[int]:
    """A paused, firmware-less ``qemu-system-x86_64`` with *image* attached to a virtio-blk
    device, as a running VM holds its disk. Yields the pid; kills QEMU on exit."""
    image = Path(image)
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-blockdev",
        f"driver={fmt},node-name=d,file.driver=file,file.filename={image}",
        "-device",
        "virtio-blk-pci,drive=d",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        # QEMU takes the image lock while it parses -blockdev, before anything that could be
        # waited for over QMP.
        deadline = time.monotonic() + 30
        while not _locked(image):
            if proc.poll() is not None:
                raise AssertionError(f"QEMU exited {proc.returncode}: {Path(log).read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError("QEMU did not lock the image within 30 s")
            time.sleep(0.05)
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=30)


def resident_fraction(path: str | Path) -> float:
    """How much of a file the host page cache holds (``mincore`` of a private mapping)."""
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vector = (ctypes.c_ubyte * pages)()
        buffer = (ctypes.c_char * size).from_buffer(mapping)
        try:
            if libc.mincore(
                ctypes.c_void_p(ctypes.addressof(buffer)), ctypes.c_size_t(size), vector
            ):
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            del buffer
        return sum(v & 1 for v in vector) / pages
    finally:
        mapping.close()


def make_snapshot(
    name: str, parent: str | None = None, *, image: str | Path = "/a.qcow2", **fields: Any
) -> Snapshot:
    """A store/tree record for tests: an internal, crash-consistent disk-only snapshot of disk
    ``vda`` in ``image`` of a shut-off VM, unless ``fields`` say otherwise."""
    values: dict[str, Any] = {
        "kind": SnapshotKind.INTERNAL,
        "memory": MemoryKind.NONE,
        "consistency": Consistency.CRASH,
        "vm_state": VMState.SHUTOFF,
        "created": "2026-01-01T00:00:00Z",
        "disks": (DiskSnapshot("vda", DiskSnapshotKind.INTERNAL, str(image)),),
    }
    return Snapshot(name=name, parent=parent, **{**values, **fields})
