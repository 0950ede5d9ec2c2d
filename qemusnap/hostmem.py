"""Host memory and the live checkpoint's guest pause.

A ``background-snapshot`` migration does two things over all guest RAM while the guest is
paused (QEMU 7.2, ``bg_migration_thread``; qemusnap pauses before ``migrate`` so that disks
and RAM are cut at one instant):

* ``ram_write_tracking_prepare`` reads one byte of every *host page* of guest RAM.  Over
  4 KiB pages that is 262144 reads per GiB, ~5 ms/GiB here: the one part of the pause that
  grows with RAM.  With guest RAM on 2 MiB huge pages (``MachineConfig.hugepages``, or
  ``-mem-path``/``memory-backend-memfd,hugetlb=on`` on a foreign QEMU) it is 512 times fewer
  reads and the pause is flat.
* ``UFFDIO_WRITEPROTECT`` walks the page tables: cheap over 2 MiB transparent huge pages,
  ~0.07 ms per MiB over 4 KiB pages.  During the snapshot each guest write is resolved by
  un-protecting one 4 KiB page, which splits the transparent huge page around it, so the next
  live checkpoint paused the guest several times longer (1 GiB TCG guest: 9 ms first, then
  65-73 ms).  :func:`collapse_guest_ram` (``process_madvise(MADV_COLLAPSE)``, Linux 6.1),
  done before the pause while the guest runs, restores the huge pages (10-13 ms every time).
  Best effort only: another user's QEMU, an older kernel, THP disabled, a remote QEMU:
  nothing happens and the pause is merely longer.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("qemusnap.hostmem")

#: The huge page size ``MachineConfig.hugepages`` uses.
HUGE_PAGE_MIB = 2
_HUGE_PAGES = Path(f"/sys/kernel/mm/hugepages/hugepages-{HUGE_PAGE_MIB * 1024}kB")
_RESERVATION_LOCK = "/dev/shm/qemusnap-hugepages.lock"

_SYS_PROCESS_MADVISE = 440  # x86_64, aarch64 (asm-generic)
_MADV_COLLAPSE = 25
_HUGE = 2 << 20
_CHUNK = 64 << 20  # one call per 64 MiB keeps each system call short
_MIN_MAPPING = 64 << 20


class _IoVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def guest_ram_mappings(pid: int) -> list[tuple[int, int]]:
    """Large private anonymous read-write mappings of ``pid``: QEMU's guest RAM blocks
    (executable ones, like TCG's code buffer, are left out)."""
    found = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            anonymous = len(fields) < 6
            if anonymous and fields[1] == "rw-p" and high - low >= _MIN_MAPPING:
                found.append((low, high))
    return found


def collapse_guest_ram(pid: int) -> int:
    """Ask the kernel to back QEMU's guest RAM with huge pages again; returns bytes advised
    (0 when not possible here).  Blocking: call it in a thread."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        log.debug("no huge-page collapse for pid %s: %s", pid, exc)
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    done = 0
    try:
        for low, high in guest_ram_mappings(pid):
            start, end = (low + _HUGE - 1) & ~(_HUGE - 1), high & ~(_HUGE - 1)
            for address in range(start, end, _CHUNK):
                iov = _IoVec(address, min(_CHUNK, end - address))
                result = libc.syscall(
                    _SYS_PROCESS_MADVISE, pidfd, ctypes.byref(iov), 1, _MADV_COLLAPSE, 0
                )
                if result < 0:
                    errno = ctypes.get_errno()
                    log.debug("MADV_COLLAPSE of pid %s failed: %s", pid, os.strerror(errno))
                    if errno in (1, 22, 38):  # EPERM, EINVAL (old kernel), ENOSYS: give up
                        return done
                else:
                    done += result
    except OSError as exc:
        log.debug("no huge-page collapse for pid %s: %s", pid, exc)
    finally:
        os.close(pidfd)
    return done


def free_huge_pages() -> int:
    """How many 2 MiB huge pages are free for a new QEMU (0 without hugetlbfs support)."""
    try:
        return int((_HUGE_PAGES / "free_hugepages").read_text())
    except (OSError, ValueError):
        return 0


@contextlib.contextmanager
def huge_pages_free(count: int) -> Iterator[None]:
    """At least ``count`` 2 MiB huge pages free for the block (for tests and benchmarks): raises
    ``vm.nr_hugepages`` if needed (root only) and gives back what it added afterwards.

    One block at a time on the machine: an flock on ``/dev/shm/qemusnap-hugepages.lock`` (which
    the matrix chroots share), since two processes that each saw enough free pages would
    otherwise both start a QEMU on the same ones.

    :raise PermissionError: not enough free and not allowed to reserve more.
    :raise MemoryError: the kernel could not find that much contiguous memory.
    """
    with open(_RESERVATION_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        short = count - free_huge_pages()
        if short <= 0:
            yield
            return
        total = _HUGE_PAGES / "nr_hugepages"
        before = int(total.read_text())
        total.write_text(str(before + short))
        try:
            if free_huge_pages() < count:
                raise MemoryError(f"the kernel reserved fewer than {count} free huge pages")
            yield
        finally:
            total.write_text(str(before))
