"""Pure logic of adoption and rebuild: what the images and sidecars say, against the store.

No I/O.  The engine (``qemusnap.rebuild``) reads the images' snapshot tables
(``qemu-img snapshot -l``) and the sidecar files (:mod:`qemusnap.sidecar`), then asks this
module three questions:

* :func:`match_tags`: which internal snapshot tags form one snapshot of the VM.  A tag held by
  every qcow2 disk is one snapshot; one held by some disks only is *partial* (it can only be
  deleted: reverting would mix instants).
* :func:`adopt`: the records of tags the store does not know, placed in the tree by date (the
  images record no parent): each hangs under the newest snapshot taken before it.
* :func:`tree_from_sidecars` / :func:`diff`: the tree the sidecars describe (snapshots whose
  data is gone dropped, their children moved up), and how the store differs from it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from .models import (
    Consistency,
    DiskSnapshot,
    DiskSnapshotKind,
    InternalSnapshotInfo,
    MemoryKind,
    Snapshot,
    SnapshotKind,
    VMState,
)


@attrs.frozen
class DiskTags:
    """One disk of the VM and the internal snapshot table of its active image."""

    disk: str
    file: str
    format: str
    tags: tuple[InternalSnapshotInfo, ...] = ()


@attrs.frozen
class FoundTag:
    """One tag name across the VM's disks."""

    name: str
    files: Mapping[str, str]  # disk name -> image holding the tag
    date_sec: int  # the earliest date any disk records for it
    order: int  # position in the first holding image's table (ties of date_sec)
    vm_state_disk: str | None  # the disk whose image holds the VM state, if any
    partial: bool


def match_tags(disks: Sequence[DiskTags]) -> list[FoundTag]:
    """Group the tags of every qcow2 disk by name, oldest first.  Raw disks hold no internal
    snapshots: they do not count towards "every disk"."""
    qcow2 = [d for d in disks if d.format == "qcow2"]
    names: dict[str, dict[str, InternalSnapshotInfo]] = {}
    order: dict[str, int] = {}
    for disk in qcow2:
        for position, tag in enumerate(disk.tags):
            names.setdefault(tag.name, {})[disk.disk] = tag
            order.setdefault(tag.name, position)
    found = []
    by_disk = {d.disk: d for d in qcow2}
    for name, held in names.items():
        vm_state = next((disk for disk, tag in held.items() if tag.vm_state_size > 0), None)
        found.append(
            FoundTag(
                name=name,
                files={disk: by_disk[disk].file for disk in held},
                date_sec=min(tag.date_sec for tag in held.values()),
                order=order[name],
                vm_state_disk=vm_state,
                partial=len(held) < len(qcow2),
            )
        )
    return sorted(found, key=lambda f: (f.date_sec, f.order))


def iso(date_sec: int) -> str:
    """The store's date format (ISO 8601, UTC) for a qcow2 snapshot's ``date-sec``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(date_sec))


def adopt(
    found: Iterable[FoundTag], disk_names: Sequence[str], known: Sequence[Snapshot]
) -> list[Snapshot]:
    """Records for the tags whose names ``known`` lacks, oldest first.

    The images keep no parent: each adopted snapshot hangs under the newest complete snapshot
    (known or adopted) created at or before it.  A partial one is a leaf, never a parent.
    If nothing is current yet, the newest complete adopted snapshot becomes current: the
    disks' present content comes after it, as after a ``qemu-img snapshot -c``.
    """
    known_names = {s.name for s in known}
    timeline = [(s.created, s.name) for s in known if not s.partial]
    adopted: list[Snapshot] = []
    for tag in found:
        if tag.name in known_names:
            continue
        created = iso(tag.date_sec)
        parent = max((t for t in timeline if t[0] <= created), default=None)
        checkpoint = tag.vm_state_disk is not None
        # snapshot-load reads the VM state from the first device it is given (engine), so the
        # disk holding it is listed first.
        order = sorted(disk_names, key=lambda d: d != tag.vm_state_disk)
        adopted.append(
            Snapshot(
                name=tag.name,
                parent=parent[1] if parent else None,
                kind=SnapshotKind.INTERNAL,
                memory=MemoryKind.INTERNAL if checkpoint else MemoryKind.NONE,
                consistency=Consistency.FULL if checkpoint else Consistency.CRASH,
                # qcow2 records no run state: a VM state is saved from a VM that ran (savevm,
                # virsh snapshot-create-as); disks alone come from a stopped one (qemu-img).
                vm_state=VMState.RUNNING if checkpoint else VMState.SHUTOFF,
                created=created,
                disks=tuple(
                    DiskSnapshot(d, DiskSnapshotKind.INTERNAL, tag.files[d])
                    if d in tag.files
                    else DiskSnapshot(d, DiskSnapshotKind.EXCLUDED, None)
                    for d in order
                ),
                adopted=True,
                partial=tag.partial,
            )
        )
        if not tag.partial:
            timeline.append((created, tag.name))
    if not any(s.current for s in known):
        newest = [s for s in adopted if not s.partial]
        if newest:
            adopted[adopted.index(newest[-1])] = attrs.evolve(newest[-1], current=True)
    return adopted


@attrs.frozen
class Described:
    """One snapshot as a sidecar describes it."""

    snapshot: Snapshot
    seq: int
    written: int  # nanoseconds, to pick the newest VM record

    @classmethod
    def from_document(cls, document: Mapping[str, Any]) -> Described:
        return cls(
            Snapshot.from_json(document["snapshot"]),
            int(document.get("seq", 0)),
            int(document.get("written", 0)),
        )


def tree_from_sidecars(
    described: Iterable[Described], alive: Iterable[str]
) -> tuple[list[Snapshot], list[str]]:
    """The tree the sidecars describe, keeping the snapshots named in ``alive`` (their data
    exists): in creation order, each parent the nearest surviving ancestor.  Two sidecars
    claiming "current" (killed between rewriting both) resolve to the one written last.
    Returns (snapshots, names dropped)."""
    every = {d.snapshot.name: d for d in described}
    alive = set(alive)
    kept = sorted((d for d in every.values() if d.snapshot.name in alive), key=lambda d: d.seq)
    current = max((d for d in kept if d.snapshot.current), key=lambda d: d.written, default=None)
    result = []
    for entry in kept:
        parent = entry.snapshot.parent
        seen: set[str] = set()
        while parent is not None and parent not in alive and parent not in seen:
            seen.add(parent)
            parent = every[parent].snapshot.parent if parent in every else None
        result.append(
            attrs.evolve(
                entry.snapshot,
                parent=parent,
                current=current is not None and entry.snapshot.name == current.snapshot.name,
            )
        )
    dropped = sorted(set(every) - alive)
    return result, dropped


@attrs.frozen
class Difference:
    """One way the store disagrees with what the disks and sidecars say."""

    snapshot: str | None  # None: about the VM (its current snapshot)
    what: str  # only-in-store | only-on-disk | differs | current
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "difference": self.what, "detail": self.detail}


_COMPARED = ("parent", "kind", "memory", "memory_file", "consistency", "vm_state", "created",
             "description", "disks", "adopted", "partial")  # fmt: skip


def diff(store: Sequence[Snapshot], found: Sequence[Snapshot]) -> list[Difference]:
    """Every difference between the store's tree and the one found on disk."""
    differences: list[Difference] = []
    ours = {s.name: s for s in store}
    theirs = {s.name: s for s in found}
    for name, snap in ours.items():
        if name not in theirs:
            differences.append(
                Difference(name, "only-in-store", "the store lists it; its data is not found")
            )
            continue
        mine, other = snap.to_json(), theirs[name].to_json()
        for key in _COMPARED:
            if mine[key] != other[key]:
                differences.append(
                    Difference(name, "differs", f"{key}: store {mine[key]!r}, disk {other[key]!r}")
                )
    for name in theirs:
        if name not in ours:
            differences.append(
                Difference(name, "only-on-disk", "found in the images/sidecars, not in the store")
            )
    current_store = next((s.name for s in store if s.current), None)
    current_found = next((s.name for s in found if s.current), None)
    if current_store != current_found and current_found is not None:
        differences.append(
            Difference(None, "current", f"store {current_store!r}, disk {current_found!r}")
        )
    return differences
