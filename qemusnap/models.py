"""Frozen attrs values passed between qemusnap's layers and returned to callers."""

from __future__ import annotations

import enum
from typing import Any

import attrs


class StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        return str(self.value)


class SnapshotKind(StrEnum):
    INTERNAL = "internal"
    EXTERNAL = "external"


class MemoryKind(StrEnum):
    NONE = "none"
    INTERNAL = "internal"  # vmstate inside a qcow2 image (snapshot-save / savevm)
    FILE = "file"  # a migration stream in a separate file


class MemoryFormat(StrEnum):
    """The layout of a memory file (see :mod:`qemusnap.capabilities`).  Records made before
    qemusnap recorded it are ``stream``: that is all it wrote then."""

    STREAM = "stream"  # QEMU's sequential migration stream (``fd:``, or ``file:`` without more)
    MAPPED_RAM = "mapped-ram"  # ``mapped-ram`` capability: each RAM page at a fixed offset


class Consistency(StrEnum):
    CRASH = "crash"
    QUIESCED = "quiesced"
    FULL = "full"


class VMState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"


class DiskSnapshotKind(StrEnum):
    INTERNAL = "internal"
    EXTERNAL = "external"
    EXCLUDED = "excluded"


class CheckOutcome(StrEnum):
    OK = "ok"
    LEAKS = "leaks"
    CORRUPT = "corrupt"


# --- images (what qemu-img says) ------------------------------------------------------------


@attrs.frozen
class InternalSnapshotInfo:
    """One entry of a qcow2 image's internal snapshot table."""

    id: str
    name: str
    vm_state_size: int
    date_sec: int
    vm_clock_nsec: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InternalSnapshotInfo:
        return cls(
            id=str(data["id"]),
            name=data["name"],
            vm_state_size=int(data.get("vm-state-size", 0)),
            date_sec=int(data.get("date-sec", 0)),
            vm_clock_nsec=int(data.get("vm-clock-sec", 0)) * 1_000_000_000
            + int(data.get("vm-clock-nsec", 0)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "vm_state_size": self.vm_state_size,
            "date_sec": self.date_sec,
            "vm_clock_nsec": self.vm_clock_nsec,
        }


@attrs.frozen
class SnapshotTag:
    """An internal snapshot of an image as far as names go: its ``id`` is None when qemusnap
    made it with ``qemu-img snapshot -c`` and has not read the table since (QEMU picks it)."""

    id: str | None
    name: str


@attrs.frozen
class ImageInfo:
    """One image of a backing chain, as ``qemu-img info --output=json`` describes it."""

    filename: str
    format: str
    virtual_size: int
    actual_size: int | None = None
    backing_filename: str | None = None  # absolute (qemu-img's full-backing-filename)
    backing_format: str | None = None
    snapshots: tuple[InternalSnapshotInfo, ...] = ()
    dirty: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageInfo:
        return cls(
            filename=data["filename"],
            format=data["format"],
            virtual_size=int(data["virtual-size"]),
            actual_size=data.get("actual-size"),
            backing_filename=data.get("full-backing-filename") or data.get("backing-filename"),
            backing_format=data.get("backing-filename-format"),
            snapshots=tuple(InternalSnapshotInfo.from_json(s) for s in data.get("snapshots", [])),
            dirty=bool(data.get("dirty-flag", False)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "format": self.format,
            "virtual_size": self.virtual_size,
            "actual_size": self.actual_size,
            "backing_filename": self.backing_filename,
            "backing_format": self.backing_format,
            "snapshots": [s.to_json() for s in self.snapshots],
        }


@attrs.frozen
class Chain:
    """The backing chain of one disk, active image first, base last."""

    disk: str
    images: tuple[ImageInfo, ...]

    @property
    def active(self) -> ImageInfo:
        return self.images[0]

    @property
    def base(self) -> ImageInfo:
        return self.images[-1]

    def to_json(self) -> dict[str, Any]:
        return {"disk": self.disk, "images": [i.to_json() for i in self.images]}


@attrs.frozen
class CheckResult:
    """The outcome of ``qemu-img check`` on one image."""

    filename: str
    result: CheckOutcome
    leaks: int = 0
    corruptions: int = 0
    leaks_fixed: int = 0
    corruptions_fixed: int = 0
    in_use: bool = False  # checked read-only (-U) because a running QEMU holds it
    # False when the format has no metadata to check (raw: qemu-img exits 63); result is ok.
    supported: bool = True

    @property
    def ok(self) -> bool:
        return self.result is CheckOutcome.OK

    def to_json(self) -> dict[str, Any]:
        return {
            "filename": self.filename,
            "result": str(self.result),
            "leaks": self.leaks,
            "corruptions": self.corruptions,
            "leaks_fixed": self.leaks_fixed,
            "corruptions_fixed": self.corruptions_fixed,
            "in_use": self.in_use,
            "supported": self.supported,
        }


@attrs.frozen
class ImageMeasure:
    """Space a new image would need (``qemu-img measure --output=json``), in bytes."""

    required: int  # for the data that is allocated now
    fully_allocated: int  # if every cluster were allocated
    bitmaps: int = 0  # persistent dirty bitmaps (qcow2 only)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageMeasure:
        return cls(
            required=int(data["required"]),
            fully_allocated=int(data["fully-allocated"]),
            bitmaps=int(data.get("bitmaps", 0)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "required": self.required,
            "fully_allocated": self.fully_allocated,
            "bitmaps": self.bitmaps,
        }


# --- disks of a VM ------------------------------------------------------------------------


@attrs.frozen
class Disk:
    """One disk of a VM: what the guest sees, and the image it writes to now."""

    name: str  # guest device id (vda) if it has one, else the block node name
    file: str  # the active image (absolute path)
    format: str  # qcow2, raw, ...
    node_name: str | None = None  # live only: the format node on top of the device
    device: str | None = None  # live only: the qdev id or path of the guest device
    read_only: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "file": self.file,
            "format": self.format,
            "node_name": self.node_name,
            "device": self.device,
            "read_only": self.read_only,
        }


# --- snapshots ------------------------------------------------------------------------------


@attrs.frozen
class DiskSnapshot:
    """What one snapshot holds of one disk."""

    name: str
    snapshot: DiskSnapshotKind
    file: str | None  # the image that holds this disk's snapshot data (None when excluded)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "snapshot": str(self.snapshot), "file": self.file}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DiskSnapshot:
        return cls(data["name"], DiskSnapshotKind(data["snapshot"]), data.get("file"))


@attrs.frozen
class Snapshot:
    """One snapshot of a VM, as qemusnap's store records it."""

    name: str
    parent: str | None
    kind: SnapshotKind
    memory: MemoryKind
    consistency: Consistency
    vm_state: VMState
    created: str  # ISO 8601, UTC
    disks: tuple[DiskSnapshot, ...]
    description: str = ""
    memory_file: str | None = None
    current: bool = False
    #: Found in the images' snapshot tables (taken by another tool), not taken by qemusnap.
    adopted: bool = False
    #: An adopted tag that only some of the VM's qcow2 disks hold: it can only be deleted.
    partial: bool = False
    #: Layout of ``memory_file`` (None when there is none).
    memory_format: MemoryFormat | None = None
    #: The machine type QEMU ran when a checkpoint was taken (``-machine`` value, e.g.
    #: ``pc-q35-7.2``): a memory file restores only into that type, whatever the alias
    #: (``q35``) means in the QEMU that restores it.  None: not recorded (older records).
    machine_type: str | None = None

    @property
    def is_checkpoint(self) -> bool:
        return self.memory is not MemoryKind.NONE

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Snapshot:
        """The inverse of :meth:`to_json` (the store's rows and the journal use it too)."""
        return cls(
            name=data["name"],
            parent=data["parent"],
            kind=SnapshotKind(data["kind"]),
            memory=MemoryKind(data["memory"]),
            memory_file=data["memory_file"],
            consistency=Consistency(data["consistency"]),
            vm_state=VMState(data["vm_state"]),
            created=data["created"],
            description=data["description"],
            disks=tuple(DiskSnapshot.from_json(d) for d in data["disks"]),
            current=bool(data.get("current", False)),
            adopted=bool(data.get("adopted", False)),
            partial=bool(data.get("partial", False)),
            memory_format=(
                MemoryFormat(data.get("memory_format") or MemoryFormat.STREAM)
                if data["memory_file"]
                else None
            ),
            machine_type=data.get("machine_type"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "parent": self.parent,
            "kind": str(self.kind),
            "memory": str(self.memory),
            "memory_file": self.memory_file,
            "consistency": str(self.consistency),
            "vm_state": str(self.vm_state),
            "created": self.created,
            "description": self.description,
            "current": self.current,
            "disks": [d.to_json() for d in self.disks],
            "adopted": self.adopted,
            "partial": self.partial,
            "memory_format": str(self.memory_format) if self.memory_format else None,
            "machine_type": self.machine_type,
        }
