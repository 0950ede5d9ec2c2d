"""The context every room of the engine works with: one VM's connections and records.

A :class:`Context` is what an operation needs and nothing more: the monitor (``None`` while
QEMU is not running), the :class:`~qemusnap.machine.Machine` qemusnap owns (if it started
QEMU), the qemu-img runner, the store and the VM's record in it, and how long to wait for the
VM's lock.  The :class:`~qemusnap.engine.VM` facade owns one and hands it to the rooms; a room
that restarts QEMU replaces ``monitor`` (and ``machine``) in it, so every room and the caller
see the new QEMU.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from .. import agent as agent_mod
from ..capabilities import Capabilities
from ..machine import Machine, RecordedLaunch
from ..memory import MemoryFiles
from ..monitor import Monitor
from ..qemu_img import QemuImg
from ..store import Store, VMRecord

# Every room logs as the engine did before it was split (callers filter on this name).
log = logging.getLogger("qemusnap.engine")

#: A caller-supplied way to start the VM again after a revert: gets the active image of each
#: disk (by disk name) and whether memory will be loaded (``-incoming defer`` wanted); returns a
#: connected Monitor of the new, paused QEMU.
RelaunchHook = Callable[[dict[str, str], bool], Awaitable[Monitor]]
#: Starts QEMU again (paused; ``incoming``: waiting for memory state), prepared beforehand;
#: given the operation's journal, it notes there the process it spawned (``spawned``) before
#: connecting to it.
Starter = Callable[[bool, Any], Awaitable[None]]

DEFAULT_TIMEOUT = 300.0
#: How long an operation waits for another one on the same VM ($QEMUSNAP_LOCK_TIMEOUT).
LOCK_TIMEOUT = float(os.environ.get("QEMUSNAP_LOCK_TIMEOUT", "30"))
QUIESCE_TIMEOUT = 10.0
RECOVERY_TIMEOUT = 120.0
_job_numbers = itertools.count(1)


def job_id(kind: str) -> str:
    """A QEMU job id recovery recognises as ours (``qemusnap-`` prefix) and no other process
    of ours reuses."""
    return f"qemusnap-{kind}-{os.getpid()}-{next(_job_numbers)}"


@attrs.define(eq=False)
class Context:
    """One VM's connections and records, shared by the facade and the rooms."""

    store: Store
    record: VMRecord
    monitor: Monitor | None = None
    machine: Machine | None = None
    qmp_socket: str | None = None
    qga_socket: str | None = None
    relaunch_hook: RelaunchHook | None = None
    lock_timeout: float = LOCK_TIMEOUT
    qemu_img: QemuImg = attrs.Factory(QemuImg)
    memory: MemoryFiles = attrs.Factory(MemoryFiles)
    #: The guest-agent connection while the guest is quiesced (None otherwise).
    agent: agent_mod.GuestAgent | None = None

    async def capabilities(self) -> Capabilities:
        """What the running QEMU can do (probed once per QMP connection, see
        :mod:`qemusnap.capabilities`: the one place that decides mechanisms per QEMU)."""
        assert self.monitor is not None
        return await self.monitor.capabilities()

    @property
    def vm_id(self) -> int:
        return self.record.id

    @property
    def live(self) -> bool:
        return self.monitor is not None

    @property
    def owner(self) -> tuple[int, int] | None:
        """(uid, gid) of the user QEMU runs as, when not us: the files made for it are theirs."""
        launch = self.store.vm(self.record.id).launch
        return RecordedLaunch.from_json(launch).owner if launch and "argv" in launch else None
