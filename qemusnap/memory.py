"""Memory state to and from a file: QEMU's migration stream over a passed file descriptor.

QEMU 7.2 has no ``file:`` migration URI (8.2) nor ``mapped-ram`` (9.0): the file is opened here
(mode 0600, never over an existing file), handed to QEMU with ``getfd`` and used as ``fd:NAME``.
:class:`FdTransport` is the one place that knows this; a newer QEMU can get another transport
with the same two methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from .errors import MemoryFileError, OperationTimeout, TargetExistsError
from .monitor import Monitor

log = logging.getLogger("qemusnap.memory")

#: Progress callback: (bytes written so far, total bytes expected).
Progress = Callable[[int, int], None]

# QEMU caps migration at 128 MiB/s by default; saving to a local file wants no cap.
UNLIMITED_BANDWIDTH = 1 << 40
FD_NAME = "qemusnap-memory"
POLL_INTERVAL = 0.02


class FdTransport:
    """Migration to/from a regular file through ``getfd`` + ``fd:`` URIs."""

    @contextlib.asynccontextmanager
    async def saving(
        self, monitor: Monitor, path: str, *, live: bool, owner: tuple[int, int] | None = None
    ) -> AsyncIterator[Saver]:
        """Prepare a save into the new file ``path`` (everything that need not wait for the
        guest's pause: the file, the fd hand-over, capabilities); the body then pauses the
        guest and calls :meth:`Saver.run`.  On any failure (also cancellation) a migration
        still running is cancelled and the partial file removed."""
        fd = _create_private(path)
        if owner is not None:
            os.fchown(fd, *owner)  # QEMU writes through our fd; its user reads it back later
        made = os.fstat(fd)
        try:
            # background-snapshot: QEMU write-protects guest RAM (userfaultfd) and copies a
            # page out before the guest's first write to it, so the RAM written is the RAM at
            # the moment migration starts while the guest keeps running.
            await _set_capabilities(monitor, {"background-snapshot": live})
            await monitor.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
            await monitor.send_fd(fd, FD_NAME)
            yield Saver(monitor, path, fd)
        except BaseException:
            await asyncio.shield(cancel_migration(monitor))
            with contextlib.suppress(Exception):
                await monitor.close_fd(FD_NAME)
            _remove_if_same(path, made)
            raise
        finally:
            os.close(fd)

    async def save(
        self,
        monitor: Monitor,
        path: str,
        *,
        live: bool,
        timeout: float,
        progress: Progress | None = None,
        owner: tuple[int, int] | None = None,
    ) -> None:
        """Prepare and run a save in one go (the guest's state is whatever it is now)."""
        async with self.saving(monitor, path, live=live, owner=owner) as saver:
            await saver.run(timeout=timeout, progress=progress)

    async def load(self, monitor: Monitor, path: str, *, timeout: float) -> None:
        """Load memory state from ``path`` into a QEMU started with ``-incoming defer``.

        A load already under way (its client died: QEMU goes on alone) is waited for instead:
        QEMU refuses a second ``migrate-incoming``."""
        if (await monitor.query_migrate()).get("status", "none") == "none":
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise MemoryFileError(f"cannot open memory file {path}: {exc.strerror}") from exc
            try:
                await monitor.send_fd(fd, FD_NAME)
                await monitor.execute("migrate-incoming", {"uri": f"fd:{FD_NAME}"})
            finally:
                os.close(fd)  # QEMU has its own copy
        await _wait_migration(monitor, f"loading {path}", timeout=timeout, progress=None)


class Saver:
    """A prepared save: :meth:`run` starts the migration and waits for it."""

    def __init__(self, monitor: Monitor, path: str, fd: int) -> None:
        self._monitor = monitor
        self._path = path
        self._fd = fd

    async def run(self, *, timeout: float, progress: Progress | None = None) -> None:
        await self._monitor.execute("migrate", {"uri": f"fd:{FD_NAME}"})
        await _wait_migration(
            self._monitor, f"writing {self._path}", timeout=timeout, progress=progress
        )
        # QEMU wrote everything through its own copy of the descriptor: make it durable.
        await asyncio.to_thread(os.fsync, self._fd)


def _create_private(path: str) -> int:
    """Open a new file, mode 0600 whatever the umask (guest RAM holds secrets)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError as exc:
        raise TargetExistsError(f"{path} exists already (it is never overwritten)") from exc
    except OSError as exc:
        raise MemoryFileError(f"cannot create memory file {path}: {exc.strerror}") from exc
    os.fchmod(fd, 0o600)
    return fd


def _remove_if_same(path: str, made: os.stat_result) -> None:
    with contextlib.suppress(OSError):
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (made.st_dev, made.st_ino):
            os.unlink(path)


async def _set_capabilities(monitor: Monitor, capabilities: dict[str, bool]) -> None:
    await monitor.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": v} for k, v in capabilities.items()]},
    )


async def _wait_migration(
    monitor: Monitor, what: str, *, timeout: float, progress: Progress | None
) -> None:
    """Poll ``query-migrate`` until ``completed``; ``failed``/``cancelled`` raise."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await monitor.query_migrate()
        status = info.get("status", "none")
        ram = info.get("ram") or {}
        if progress is not None and ram:
            progress(int(ram.get("transferred", 0)), int(ram.get("total", 0)))
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", status)
            raise MemoryFileError(f"{what}: migration {status}: {why}")
        if time.monotonic() > deadline:
            raise OperationTimeout(f"{what}: migration still {status} after {timeout:.0f} s")
        await asyncio.sleep(POLL_INTERVAL)


async def cancel_migration(monitor: Monitor) -> None:
    """Best effort: stop an outgoing migration that may still be running.  An incoming one
    (QEMU in "inmigrate", loading memory state) is left alone: ``migrate_cancel`` does not
    apply to it, and it is what a recovery finishes (:meth:`FdTransport.load`)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5.0):
            if (await monitor.query_status()).status == "inmigrate":
                return
            info = await monitor.query_migrate()
            if info.get("status") not in (None, "none", "completed", "failed", "cancelled"):
                await monitor.execute("migrate_cancel")
                await _wait_migration(monitor, "cancelling", timeout=5.0, progress=None)
