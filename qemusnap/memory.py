"""Memory state to and from a file: QEMU's migration stream (or mapped-ram file) on our fd.

The file is always opened here (mode 0600, never over an existing file) and handed to QEMU, so
QEMU needs no access to the directory and the file belongs to us.  How it is handed over and in
which format QEMU writes it is decided by :mod:`qemusnap.capabilities` from what the QEMU
process offers; the two transports behind :class:`MemoryFiles` are

- :class:`FdTransport`: ``getfd`` + ``fd:NAME`` (QEMU 7.2 has nothing else);
- :class:`FileTransport`: ``add-fd`` + ``file:/dev/fdset/N`` (8.2+; QEMU 11 refuses ``fd:`` to
  a regular file), as a stream or, with ``mapped-ram`` + ``multifd``, as a mapped-ram file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from .capabilities import FILE_FORMAT_CAPABILITIES, MemoryFormat, MemoryMechanism, Transport
from .errors import MemoryFileError, OperationTimeout, TargetExistsError
from .monitor import Monitor

log = logging.getLogger("qemusnap.memory")

#: Progress callback: (bytes written so far, total bytes expected).
Progress = Callable[[int, int], None]

# QEMU caps migration at 128 MiB/s by default; saving to a local file wants no cap.
UNLIMITED_BANDWIDTH = 1 << 40
FD_NAME = "qemusnap-memory"
POLL_INTERVAL = 0.02
#: Between the polls for the armed write tracking: none (see Saver._run_resuming).
ARMED_POLL_INTERVAL = 0.0


class _Handover(Protocol):
    """One way to give QEMU our file: :meth:`give` returns the migration address."""

    async def give(self, monitor: Monitor, fd: int) -> str: ...

    async def take_back(self, monitor: Monitor) -> None: ...


class FdTransport:
    """``getfd`` + ``fd:NAME``: QEMU reads or writes a stream through our descriptor."""

    async def give(self, monitor: Monitor, fd: int) -> str:
        await monitor.send_fd(fd, FD_NAME)
        return f"fd:{FD_NAME}"

    async def take_back(self, monitor: Monitor) -> None:
        await monitor.close_fd(FD_NAME)


class FileTransport:
    """``add-fd`` + ``file:/dev/fdset/N``: QEMU opens the file from the fd set (once per
    multifd channel), and can seek in it (mapped-ram)."""

    def __init__(self) -> None:
        self._fdset: int | None = None

    async def give(self, monitor: Monitor, fd: int) -> str:
        self._fdset = await monitor.add_fd(fd, opaque=FD_NAME)
        return f"file:/dev/fdset/{self._fdset}"

    async def take_back(self, monitor: Monitor) -> None:
        if self._fdset is not None:
            fdset, self._fdset = self._fdset, None
            await monitor.remove_fd_set(fdset)


def _handover(mechanism: MemoryMechanism) -> _Handover:
    return FileTransport() if mechanism.transport is Transport.FILE else FdTransport()


def _migrate_args(mechanism: MemoryMechanism, uri: str) -> dict[str, Any]:
    """``uri``, or (where QEMU deprecates ``uri``) the same address as ``channels``."""
    if not mechanism.use_channels:
        return {"uri": uri}
    transport, _, rest = uri.partition(":")
    addr: dict[str, Any] = (
        {"transport": "file", "filename": rest, "offset": 0}
        if transport == "file"
        else {"transport": "socket", "type": "fd", "str": rest}
    )
    return {"channels": [{"channel-type": "main", "addr": addr}]}


async def _configure(monitor: Monitor, mechanism: MemoryMechanism) -> None:
    """Migration capabilities and parameters for ``mechanism`` (they stick in the QEMU
    process: every known one is set, also to false)."""
    if mechanism.capabilities:
        await _set_capabilities(monitor, dict(mechanism.capabilities))
    params: dict[str, Any] = {"max-bandwidth": UNLIMITED_BANDWIDTH}
    if mechanism.multifd_channels:
        params["multifd-channels"] = mechanism.multifd_channels
    await monitor.execute("migrate-set-parameters", params)


class MemoryFiles:
    """Memory files of one VM: :meth:`saving`/:meth:`save` write one, :meth:`load` reads one.

    ``mapped_ram``: write mapped-ram files where QEMU can (None: the default, see
    :data:`MAPPED_RAM_DEFAULT`).  ``QEMUSNAP_MAPPED_RAM=0``/``1`` overrides it.
    """

    def __init__(self, *, mapped_ram: bool | None = None, channels: int | None = None) -> None:
        env = os.environ.get("QEMUSNAP_MAPPED_RAM")
        if mapped_ram is None:
            mapped_ram = env == "1" if env in ("0", "1") else MAPPED_RAM_DEFAULT
        self.mapped_ram = mapped_ram
        self.channels = channels or max(2, min(4, os.cpu_count() or 2))

    async def save_mechanism(self, monitor: Monitor, *, live: bool) -> MemoryMechanism:
        caps = await monitor.capabilities()
        return caps.save_mechanism(live=live, mapped_ram=self.mapped_ram, channels=self.channels)

    @contextlib.asynccontextmanager
    async def saving(
        self,
        monitor: Monitor,
        path: str,
        *,
        live: bool,
        owner: tuple[int, int] | None = None,
        mechanism: MemoryMechanism | None = None,
    ) -> AsyncIterator[Saver]:
        """Prepare a save into the new file ``path`` (everything that need not wait for the
        guest's pause: the file, the fd hand-over, capabilities); the body then pauses the
        guest and calls :meth:`Saver.run`.  On any failure (also cancellation) a migration
        still running is cancelled and the partial file removed.

        ``mechanism``: instead of the one :mod:`qemusnap.capabilities` picks (the benchmark
        compares them)."""
        mechanism = mechanism or await self.save_mechanism(monitor, live=live)
        handover = _handover(mechanism)
        fd = _create_private(path)
        if owner is not None:
            os.fchown(fd, *owner)  # QEMU writes through our fd; its user reads it back later
        made = os.fstat(fd)
        try:
            # background-snapshot: QEMU write-protects guest RAM (userfaultfd) and copies a
            # page out before the guest's first write to it, so the RAM written is the RAM at
            # the moment migration starts while the guest keeps running.
            await _configure(monitor, mechanism)
            uri = await handover.give(monitor, fd)
            yield Saver(monitor, path, fd, mechanism, uri)
            with contextlib.suppress(Exception):
                await handover.take_back(monitor)
        except BaseException:
            await asyncio.shield(cancel_migration(monitor))
            with contextlib.suppress(Exception):
                await asyncio.shield(handover.take_back(monitor))
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
    ) -> MemoryFormat:
        """Prepare and run a save in one go (the guest's state is whatever it is now);
        return the format written."""
        async with self.saving(monitor, path, live=live, owner=owner) as saver:
            await saver.run(timeout=timeout, progress=progress)
        return saver.format

    async def load(
        self,
        monitor: Monitor,
        path: str,
        *,
        timeout: float,
        fmt: MemoryFormat = MemoryFormat.STREAM,
    ) -> None:
        """Load memory state from ``path`` (of format ``fmt``, as recorded when it was written)
        into a QEMU started with ``-incoming defer``.

        A load already under way (its client died: QEMU goes on alone) is waited for instead:
        QEMU refuses a second ``migrate-incoming``."""
        if (await monitor.query_migrate()).get("status", "none") == "none":
            mechanism = (await monitor.capabilities()).load_mechanism(fmt, channels=self.channels)
            handover = _handover(mechanism)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise MemoryFileError(f"cannot open memory file {path}: {exc.strerror}") from exc
            try:
                await _configure(monitor, mechanism)
                uri = await handover.give(monitor, fd)
                await monitor.execute("migrate-incoming", _migrate_args(mechanism, uri))
            finally:
                os.close(fd)  # QEMU has its own copy
            await _wait_migration(monitor, f"loading {path}", timeout=timeout, progress=None)
            with contextlib.suppress(Exception):
                await handover.take_back(monitor)
            return
        await _wait_migration(monitor, f"loading {path}", timeout=timeout, progress=None)


#: mapped-ram where QEMU has it (see docs/versions.md for the measurements behind it).
MAPPED_RAM_DEFAULT = True


class Saver:
    """A prepared save: :meth:`run` starts the migration and waits for it."""

    def __init__(
        self, monitor: Monitor, path: str, fd: int, mechanism: MemoryMechanism, uri: str
    ) -> None:
        self._monitor = monitor
        self._path = path
        self._fd = fd
        self.mechanism = mechanism
        self._uri = uri

    @property
    def format(self) -> MemoryFormat:
        return self.mechanism.format

    async def run(
        self,
        *,
        timeout: float,
        progress: Progress | None = None,
        resume_when_armed: bool = False,
    ) -> None:
        """Write the file.  ``resume_when_armed`` (a live checkpoint of a VM that *we*
        paused): ``cont`` the guest as soon as QEMU has armed the RAM write tracking.

        Why: the background-snapshot thread (``bg_migration_thread``) stops the VM, saves the
        device state, starts the write tracking and queues ``bg_migration_vm_start_bh``, all
        under the big QEMU lock, then lets go of the lock and starts writing RAM pages.  QEMU
        7.2's bottom half ran ``vm_start()``; from 8.0 on it runs ``vm_resume(vm_old_state)``,
        and the old state is "paused" because we stopped the guest for the disk cut, so the
        guest would stay paused for the whole RAM write.  Once ``query-migrate`` counts RAM
        pages the bottom half is queued before anything we send next, so a ``cont`` then
        keeps "disks and RAM at one instant" and loses nothing.  Where QEMU already resumed the
        guest (7.2) its ``RESUME`` event came first and nothing is sent."""
        monitor = self._monitor
        what = f"writing {self._path}"
        if resume_when_armed:
            await self._run_resuming(what, timeout=timeout, progress=progress)
        else:
            await monitor.execute("migrate", _migrate_args(self.mechanism, self._uri))
        await _wait_migration(monitor, what, timeout=timeout, progress=progress)
        # QEMU wrote everything through its own copy of the descriptor: make it durable.
        await asyncio.to_thread(os.fsync, self._fd)
        if self.format is MemoryFormat.MAPPED_RAM:
            # Out of the page cache once on disk (as libvirt does with its save files): with
            # every checkpoint's gigabytes kept there, each next mapped-ram write was up to
            # 10x slower here (docs/versions.md), and mapped-ram reads back fast from disk.
            # A stream file stays: a revert right after would read it 7x slower from disk.
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    async def _run_resuming(self, what: str, *, timeout: float, progress: Progress | None) -> None:
        """``migrate``, then ``cont`` as soon as the write tracking is armed, unless QEMU
        resumed the guest itself.

        Every step here is guest pause, and on a loaded host each QMP round trip costs
        milliseconds, so there are as few as possible (measured in docs/versions.md):

        - the ``query-migrate`` polls go back to back (no sleep between them): most of the
          time one is queued inside QEMU behind the big lock the migration thread holds, and
          it is answered right after the bottom half has run;
        - no ``query-status`` before the ``cont``: whether QEMU resumed the guest itself
          (7.2's ``vm_start()`` in the bottom half) is known from its ``RESUME`` event, which
          QEMU emits before the reply to any later command (events and replies share the
          QMP stream, in order).  A ``cont`` sent to a running guest anyway would be harmless
          (``vm_prepare_start``: no state change, only a STOP/RESUME event pair).
        """
        monitor = self._monitor
        async with monitor.listen("RESUME") as resumed:
            await monitor.execute("migrate", _migrate_args(self.mechanism, self._uri))
            await _wait_migration(
                monitor,
                what,
                timeout=timeout,
                progress=progress,
                until=_ram_flowing,
                interval=ARMED_POLL_INTERVAL,
            )
            if not resumed.drain():
                await monitor.cont()


def _ram_flowing(info: dict[str, Any]) -> bool:
    """RAM pages are being written (or all are): the write tracking is armed."""
    ram = info.get("ram") or {}
    pages = sum(int(ram.get(k, 0) or 0) for k in ("normal", "duplicate"))
    return pages > 0


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


async def plain_vmstate(monitor: Monitor) -> None:
    """Clear what a memory file left set for the next ``snapshot-save``/``snapshot-load``.

    Migration capabilities stick in a QEMU process, and these jobs write the vmstate through the
    migration code: QEMU 10.0 segfaults in ``snapshot-save`` while ``mapped-ram``/``multifd``
    are still on from a checkpoint taken before (observed).  Only what is on is cleared."""
    sticky = {
        str(cap["capability"]): False
        for cap in await monitor.execute("query-migrate-capabilities")
        if cap["state"] and cap["capability"] in FILE_FORMAT_CAPABILITIES
    }
    if sticky:
        await _set_capabilities(monitor, sticky)


async def _set_capabilities(monitor: Monitor, capabilities: dict[str, bool]) -> None:
    await monitor.execute(
        "migrate-set-capabilities",
        {"capabilities": [{"capability": k, "state": v} for k, v in capabilities.items()]},
    )


async def _wait_migration(
    monitor: Monitor,
    what: str,
    *,
    timeout: float,
    progress: Progress | None,
    until: Callable[[dict[str, Any]], bool] | None = None,
    interval: float = POLL_INTERVAL,
) -> None:
    """Poll ``query-migrate`` until ``completed`` (or ``until`` says so of an active
    migration); ``failed``/``cancelled`` raise."""
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = await monitor.query_migrate()
        status = info.get("status", "none")
        ram = info.get("ram") or {}
        if progress is not None and ram:
            progress(int(ram.get("transferred", 0)), int(ram.get("total", 0)))
        if status == "completed" or (until is not None and status == "active" and until(info)):
            return
        if status in ("failed", "cancelled"):
            why = info.get("error-desc", status)
            raise MemoryFileError(f"{what}: migration {status}: {why}")
        if time.monotonic() > deadline:
            raise OperationTimeout(f"{what}: migration still {status} after {timeout:.0f} s")
        await asyncio.sleep(interval)


async def cancel_migration(monitor: Monitor) -> None:
    """Best effort: stop an outgoing migration that may still be running.  An incoming one
    (QEMU in "inmigrate", loading memory state) is left alone: ``migrate_cancel`` does not
    apply to it, and it is what a recovery finishes (:meth:`MemoryFiles.load`)."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(5.0):
            if (await monitor.query_status()).status == "inmigrate":
                return
            info = await monitor.query_migrate()
            if info.get("status") not in (None, "none", "completed", "failed", "cancelled"):
                await monitor.execute("migrate_cancel")
                await _wait_migration(monitor, "cancelling", timeout=5.0, progress=None)
