"""Boot once, test in parallel: the pytest plugin's pytest-xdist support.

The xdist controller makes one shared directory for the run (short, under /tmp) and hands it to
every worker.  In it::

    lock            flock: the first worker to take it boots the guest
    state/          the booted source VM's qemusnap state directory
    run-gwN/        each worker's run directory (the source's disks live in the booter's)
    golden.mem      the golden checkpoint's memory file
    golden.json     written once the golden checkpoint exists: {"snapshot": NAME}
    failed          written instead when booting or the checkpoint failed: the reason
    gwN/            each worker's clone (qemusnap.engine.clone): DIR/qmp.sock, overlays, state/

The first worker boots the guest, runs ``qemusnap_prepare``, takes the golden *external*
checkpoint (overlays + memory file), publishes it and releases the lock; it then stops the
source.  Every worker, the first included, starts its own clone from that checkpoint and takes
an internal checkpoint of the clone's own qcow2 overlays, so the per-test reset is the same
in-place ``snapshot-load`` as without xdist.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import struct
import time
from pathlib import Path

import attrs

from .engine import VM
from .errors import OperationError, OperationTimeout
from .harness import SyncVM, _LoopThread
from .machine import Drive, MachineConfig, pid_alive

__all__ = ["Shared", "clone_for_worker", "kill_leftovers"]

CLONE_TIMEOUT = 300.0


class Shared:
    """The run's shared directory, as one worker sees it."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.state_dir = self.path / "state"
        self._manifest = self.path / "golden.json"
        self._failed = self.path / "failed"
        self._fd: int | None = None

    def run_dir(self, worker: str) -> Path:
        path = self.path / f"run-{worker}"
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def published(self) -> bool:
        return self._manifest.exists()

    def snapshot(self) -> str:
        return str(json.loads(self._manifest.read_text())["snapshot"])

    def _check_failed(self) -> None:
        if self._failed.exists():
            raise OperationError(f"the worker that booted the guest failed: {self._failed_text()}")

    def _failed_text(self) -> str:
        with contextlib.suppress(OSError):
            return self._failed.read_text().strip()
        return "unknown reason"

    def acquire(self, *, deadline: float) -> bool:
        """True: this worker boots the guest (it holds the lock until :meth:`publish` or
        :meth:`give_up`).  False: the golden checkpoint is there to clone."""
        end = time.monotonic() + deadline
        fd = os.open(self.path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            while True:
                if self.published():
                    os.close(fd)
                    return False
                self._check_failed()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if time.monotonic() > end:
                        raise OperationTimeout(
                            f"no golden checkpoint after {deadline:g} s (another worker boots"
                            " the guest)"
                        ) from None
                    time.sleep(0.1)
                    continue
                if self.published() or self._failed.exists():
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    continue
                self._fd = fd
                return True
        except BaseException:
            if self._fd is None:
                os.close(fd)
            raise

    def _release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def publish(self, source: SyncVM, name: str) -> None:
        """Take the golden external checkpoint of the booted ``source`` and publish it."""
        memory = self.path / f"{name}.mem"
        if any(s.name == name for s in source.snapshots()):
            source.delete(name)
        source.create(name, memory_file=str(memory))
        tmp = self._manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"snapshot": name}))
        os.replace(tmp, self._manifest)
        self._release()

    def give_up(self, reason: str) -> None:
        """Tell the other workers booting failed (they fail with ``reason`` instead of each
        trying again)."""
        if not self.published():
            self._failed.write_text(reason + "\n")
        self._release()


def clone_config(config: MachineConfig, directory: Path, overlays: dict[str, str]) -> MachineConfig:
    """``config`` as seen from a clone in ``directory``: the paths qemusnap.clone_argv gave the
    serial log and agent socket of a :class:`MachineConfig` command line (chardev ids
    ``qs-serial`` and ``qs-qga0``), and the clone's overlays."""
    return attrs.evolve(
        config,
        drives=tuple(
            Drive(overlays.get(d.id, d.file), d.id, "qcow2", d.device) for d in config.drives
        ),
        serial_log=str(directory / "qs-serial.log") if config.serial_log else None,
        qga_socket=str(directory / "qs-qga0.sock") if config.qga_socket else None,
        qmp_socket=str(directory / "qmp.sock"),
    )


def clone_for_worker(
    shared: Shared, config: MachineConfig, worker: str, *, loop: _LoopThread | None = None
) -> SyncVM:
    """Start ``worker``'s clone of the published golden checkpoint (a running VM), in the
    event loop thread ``loop`` (default: a new one)."""
    directory = shared.path / worker
    name = shared.snapshot()

    async def make() -> VM:
        async with await VM.cold([], state_dir=shared.state_dir) as source:
            return await source.clone(name, str(directory), timeout=CLONE_TIMEOUT)

    own = loop is None
    loop = loop or _LoopThread()
    try:
        vm = loop.run(make(), CLONE_TIMEOUT, f"cloning {name}")
    except BaseException:
        if own:
            loop.stop()
        raise
    mine = clone_config(config, directory, {d.name: d.file for d in vm.record.disks})
    vm.ctx.qga_socket = mine.qga_socket
    return SyncVM(vm, loop, config=mine)


def kill_leftovers(shared: str | os.PathLike[str]) -> None:
    """Kill the QEMU of any clone a crashed worker left running (found by its QMP socket)."""
    for sock in Path(shared).glob("*/qmp.sock"):
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(str(sock))
                creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            pid = int(struct.unpack("3i", creds)[0])
            if str(sock).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
                end = time.monotonic() + 10
                while pid_alive(pid) and time.monotonic() < end:
                    time.sleep(0.02)
        except OSError:
            continue
