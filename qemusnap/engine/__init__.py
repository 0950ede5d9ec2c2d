"""The engine: snapshot operations on one VM, live (QMP) or cold (qemu-img).

A :class:`VM` is the handle callers hold.  It is opened one of three ways:

* :meth:`VM.attach` — a running QEMU, by its QMP socket path (or a connected :class:`Monitor`);
* :meth:`VM.launch` — a QEMU qemusnap starts from a :class:`MachineConfig` (and owns);
* :meth:`VM.cold` — the disk images of a VM that is not running.

``VM`` is a thin facade over a package of rooms, one per operation, each with its journal steps
and its recovery (docs/architecture.md):

* :mod:`.context` — the :class:`Context` the rooms share (monitor, qemu-img, store, record);
* :mod:`.journal` — the lock, the journal, recovery dispatched by operation name;
* :mod:`.create`, :mod:`.create_internal`, :mod:`.create_external` — create;
* :mod:`.revert` — revert; :mod:`.delete` and :mod:`.merge` — delete and its plan runner;
* :mod:`.save_restore` — memory-only save and restore;
* :mod:`.rebuild` — adopt what the images hold, rebuild the store from them (docs/adopt.md);
* :mod:`.restart` — stopping and restarting QEMU (relaunch, argv rewrite);
* :mod:`.shared` — small steps several rooms take; :mod:`.opening` — finding a VM's record;
* :mod:`.resets` — golden snapshot, reset, restore point (re-exported by the harness).

Every mutating operation takes the VM's cross-process lock, first repairs what an interrupted
earlier operation left (the journal), and journals itself before its first irreversible step.
An operation that fails is rolled back by the very code that repairs a crashed one, so both
paths stay honest.
"""

from .context import (
    DEFAULT_TIMEOUT,
    LOCK_TIMEOUT,
    QUIESCE_TIMEOUT,
    RECOVERY_TIMEOUT,
    Context,
    RelaunchHook,
    Starter,
)
from .vm import VM

__all__ = [
    "DEFAULT_TIMEOUT",
    "LOCK_TIMEOUT",
    "QUIESCE_TIMEOUT",
    "RECOVERY_TIMEOUT",
    "VM",
    "Context",
    "RelaunchHook",
    "Starter",
]
