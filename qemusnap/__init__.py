"""qemusnap: snapshots of QEMU/KVM virtual machines over QMP and qemu-img, without libvirt.

Start with :class:`VM` (``VM.attach``, ``VM.launch``, ``VM.cold``); errors derive from
:class:`QemuSnapError`.
"""

import logging

from .discover import Difference
from .engine import VM, RelaunchHook
from .engine.rebuild import RebuildReport
from .errors import (
    BusyError,
    CommandError,
    DiskNotFoundError,
    GuestAgentError,
    ImageInUseError,
    InvalidNameError,
    JobError,
    LaunchError,
    MonitorConnectError,
    MonitorError,
    OperationError,
    OperationTimeout,
    QemuImgError,
    QemuSnapError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StoreError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
    VMNotFoundError,
)
from .machine import Drive, Machine, MachineConfig
from .models import (
    Chain,
    CheckOutcome,
    CheckResult,
    Consistency,
    Disk,
    DiskSnapshot,
    DiskSnapshotKind,
    ImageInfo,
    InternalSnapshotInfo,
    MemoryKind,
    Snapshot,
    SnapshotKind,
    VMState,
)
from .monitor import Monitor
from .qemu_img import QemuImg
from .tree import SnapshotTree

__version__ = "0.1.0"

__all__ = [
    "VM",
    "BusyError",
    "Chain",
    "CheckOutcome",
    "CheckResult",
    "CommandError",
    "Consistency",
    "Difference",
    "Disk",
    "DiskNotFoundError",
    "DiskSnapshot",
    "DiskSnapshotKind",
    "Drive",
    "GuestAgentError",
    "ImageInUseError",
    "ImageInfo",
    "InternalSnapshotInfo",
    "InvalidNameError",
    "JobError",
    "LaunchError",
    "Machine",
    "MachineConfig",
    "MemoryKind",
    "Monitor",
    "MonitorConnectError",
    "MonitorError",
    "OperationError",
    "OperationTimeout",
    "QemuImg",
    "QemuImgError",
    "QemuSnapError",
    "RebuildReport",
    "RelaunchHook",
    "Snapshot",
    "SnapshotExistsError",
    "SnapshotKind",
    "SnapshotNotFoundError",
    "SnapshotTree",
    "StoreError",
    "TargetExistsError",
    "UnsupportedError",
    "UsageError",
    "VMNotFoundError",
    "VMState",
]

logging.getLogger("qemusnap").addHandler(logging.NullHandler())
