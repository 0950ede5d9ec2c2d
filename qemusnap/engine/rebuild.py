"""The adopt/rebuild room: what the images and the sidecars beside them hold, into the store.

Pure logic (matching tags across disks, places by date, the sidecar tree, differences) is in
:mod:`qemusnap.discover`; the sidecar files in :mod:`qemusnap.sidecar` and the store.

* first contact and ``qemusnap adopt``: snapshots found on disk that the store does not know
  are added (internal tags another tool made, marked ``adopted``; and snapshots whose sidecars
  survive a lost state directory);
* ``qemusnap rebuild``: the tree the disks describe replaces the store's (with the state
  directory gone or empty, or with ``--apply``); otherwise the differences are reported;
* ``check``: the same differences, next to the images' own check.

The images are never written here: only the store (and, through it, the sidecars).

Steps of ``rebuild`` (journal entry ``rebuild``, data ``{name, committed}``), crash points:

1. ``journaled``: the entry is written (the lock is held since the start);
2. ``scanned``: images and sidecars read, nothing written yet;
3. ``half-recorded``: inside the one SQLite transaction that replaces the VM's tree
   (:meth:`Store.replace_snapshots`), half the snapshots written;
4. the transaction commits; ``committed=True`` is journaled; ``committed``;
5. the sidecars are rewritten from the new store; the entry ends.

Recovery (:func:`recover_rebuild`): killed before the commit, SQLite rolled the transaction
back, the store is as it was and there is nothing to undo (running ``rebuild`` again, or the
next command's first contact on an empty store, does the whole job); killed after it, the
sidecars are rewritten from the store.  Never the images: this room does not write them.

``adopt`` (and first contact) adds what the store lacks in one transaction, then the store
rewrites the sidecars: no journal entry, an interrupted adopt left nothing or everything.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import attrs

from .. import sidecar
from ..aio import deadline
from ..discover import (
    Described,
    Difference,
    DiskTags,
    FoundTag,
    diff,
    match_tags,
    tree_from_sidecars,
)
from ..discover import adopt as adopt_tags
from ..errors import OperationError
from ..models import Disk, DiskSnapshotKind, MemoryKind, Snapshot
from ..qemu_img import QemuImg
from ..store import DiskRecord, Store
from .context import DEFAULT_TIMEOUT, Context
from .journal import Journal, journaled, operation, recovers
from .shared import disks as current_disks

log = logging.getLogger("qemusnap.rebuild")


@attrs.frozen
class Discovery:
    """What the disks say about one VM."""

    uid: str | None  # the VM identity its sidecars carry (None: no sidecar found)
    snapshots: tuple[Snapshot, ...]  # the tree: sidecar-described, then adopted tags
    dropped: tuple[str, ...]  # sidecar-described snapshots whose data is gone
    vm: dict[str, Any] | None  # the newest VM record a sidecar holds
    sidecars: int  # how many sidecars of this VM were read
    tags: tuple[FoundTag, ...] = ()  # the internal tags of the active images, matched


@attrs.frozen
class RebuildReport:
    """The outcome of ``rebuild``/``adopt``: differences found, and whether they were applied."""

    differences: tuple[Difference, ...]
    applied: bool
    added: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "added": list(self.added),
            "dropped": list(self.dropped),
            "differences": [d.to_json() for d in self.differences],
        }


class _Images:
    """Cached ``qemu-img info`` of images (read-only, ``-U``: QEMU may have them open)."""

    def __init__(self, qemu_img: QemuImg) -> None:
        self.qemu_img = qemu_img
        self._tags: dict[str, set[str] | None] = {}

    async def tags(self, path: str) -> set[str] | None:
        """Tag names of ``path``; None if it is missing or not an image."""
        if path not in self._tags:
            if not os.path.exists(path):
                self._tags[path] = None
            else:
                try:
                    (info,) = await self.qemu_img.info(path, backing_chain=False, force_share=True)
                    self._tags[path] = {t.name for t in info.snapshots}
                except OperationError:
                    self._tags[path] = None
        return self._tags[path]


def _relocate(path: str | None, search: Sequence[str]) -> str | None:
    """``path`` if it exists, else a file of the same name in a search directory."""
    if path is None or os.path.exists(path):
        return path
    for directory in search:
        candidate = os.path.join(os.path.abspath(directory), os.path.basename(path))
        if os.path.exists(candidate):
            return candidate
    return path


async def _alive(snap: Snapshot, images: _Images) -> bool:
    """Whether every file ``snap`` needs exists (and holds its tag, for internal ones)."""
    for disk in snap.disks:
        if disk.snapshot is DiskSnapshotKind.EXCLUDED or not disk.file:
            continue
        tags = await images.tags(disk.file)
        if tags is None:
            return False
        if disk.snapshot is DiskSnapshotKind.INTERNAL and snap.name not in tags:
            return False
    if snap.memory is MemoryKind.FILE:
        return snap.memory_file is not None and os.path.exists(snap.memory_file)
    return True


def _relocated(snap: Snapshot, search: Sequence[str]) -> Snapshot:
    """``snap`` with its missing files looked up in the search directories (moved files)."""
    return attrs.evolve(
        snap,
        memory_file=_relocate(snap.memory_file, search),
        disks=tuple(attrs.evolve(d, file=_relocate(d.file, search)) for d in snap.disks),
    )


async def discover(
    store: Store,
    vm_id: int,
    disks: Sequence[Disk],
    qemu_img: QemuImg,
    search: Sequence[str] = (),
    *,
    by_chain: bool = False,
) -> Discovery:
    """Read the VM's images and the sidecars beside them (and in ``search``).  ``by_chain``:
    see :func:`_choose_uid`."""
    images = _Images(qemu_img)
    chain_files: list[str] = []
    tags: list[DiskTags] = []
    for disk in disks:
        chain = await qemu_img.chain(disk.name, disk.file, force_share=True)
        chain_files += [i.filename for i in chain.images]
        tags.append(DiskTags(disk.name, disk.file, disk.format, chain.active.snapshots))
    search = [os.path.abspath(d) for d in search]
    directories = list(dict.fromkeys([*(os.path.dirname(f) for f in chain_files), *search]))
    documents = sidecar.scan(directories)
    # A branch's images may live elsewhere: one more round through the directories the
    # sidecars found so far name (overlays, memory files).
    more = {
        os.path.dirname(path)
        for _, doc in documents
        for path in _files_of(doc)
        if os.path.dirname(path) not in directories
    }
    documents += sidecar.scan(sorted(more))
    uid = _choose_uid(store.vm(vm_id).uid, documents, set(chain_files), disks, by_chain=by_chain)
    mine = [doc for _, doc in documents if doc.get("vm", {}).get("uid") == uid]
    described = []
    for doc in mine:
        try:
            entry = Described.from_document(doc)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring a damaged sidecar of %s: %s", doc.get("snapshot"), exc)
            continue
        described.append(attrs.evolve(entry, snapshot=_relocated(entry.snapshot, search)))
    alive = [d.snapshot.name for d in described if await _alive(d.snapshot, images)]
    tree, dropped = tree_from_sidecars(described, alive)
    # A dropped snapshot's tag left on some disks only is adopted again, as partial: it can
    # still be deleted.
    found_tags = tuple(match_tags(tags))
    adopted = adopt_tags(found_tags, [d.name for d in disks], tree)
    newest = max(described, key=lambda d: d.written, default=None)
    vm = next((doc["vm"] for doc in mine if newest and doc.get("written") == newest.written), None)
    return Discovery(uid, (*tree, *adopted), tuple(dropped), vm, len(mine), found_tags)


def _files_of(document: dict[str, Any]) -> list[str]:
    snap = document.get("snapshot", {})
    files = [d.get("file") for d in snap.get("disks", [])]
    files.append(snap.get("memory_file"))
    return [f for f in files if isinstance(f, str)]


def _choose_uid(
    known: str,
    documents: Sequence[tuple[str, dict[str, Any]]],
    chain_files: set[str],
    disks: Sequence[Disk],
    *,
    by_chain: bool = False,
) -> str | None:
    """The VM identity the sidecars give this VM: the store's own if some sidecar carries it,
    else that of the sidecars whose VM record runs on these very active images (the current
    snapshot's sidecar always has the latest record; the newest wins).

    Only with ``by_chain`` (an explicit ``rebuild``: the user says these disks are that VM)
    does a sidecar naming any image of the disks' chains do.  Never on first contact: a clone
    (``qemusnap clone``), or a VM made by hand on top of another VM's frozen images, reads
    through images other VMs' sidecars describe, and must not take their snapshots (nor the
    files they own) for its own."""
    uids = {doc.get("vm", {}).get("uid") for _, doc in documents}
    if known in uids:
        return known
    active = {d.file for d in disks}
    linked = [
        doc
        for _, doc in documents
        if {d.get("file") for d in doc.get("vm", {}).get("disks", [])} & active
    ]
    if not linked and by_chain:
        linked = [doc for _, doc in documents if set(_files_of(doc)) & chain_files]
    newest = max(linked, key=lambda doc: int(doc.get("written", 0)), default=None)
    return newest["vm"]["uid"] if newest else None


async def compare(
    store: Store,
    vm_id: int,
    disks: Sequence[Disk],
    qemu_img: QemuImg,
    search: Sequence[str] = (),
    *,
    by_chain: bool = False,
) -> tuple[Discovery, list[Snapshot], list[Difference]]:
    """(what the disks say, the tree to keep, how the store differs from it).

    The tree to keep is the discovered one plus store snapshots with no sidecar whose data is
    all there (taken before sidecars existed, or whose sidecar could not be written).
    """
    found = await discover(store, vm_id, disks, qemu_img, search, by_chain=by_chain)
    images = _Images(qemu_img)
    names = {s.name for s in found.snapshots}
    current = store.snapshots(vm_id)
    kept = list(found.snapshots)
    extra: list[Difference] = []
    for snap in current:
        if snap.name not in names and await _alive(snap, images):
            kept.append(
                attrs.evolve(snap, current=snap.current and not any(s.current for s in kept))
            )
            extra.append(Difference(snap.name, "no-sidecar", "its data exists; no sidecar"))
    return found, kept, [*diff(current, kept), *extra]


async def rebuild(
    ctx: Context,
    search: Sequence[str] = (),
    *,
    apply: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> RebuildReport:
    """Replace the store's tree with the one on disk when the store has none or ``apply``;
    else only report how they differ."""
    async with deadline(timeout, "rebuild"), operation(ctx, "rebuild"):
        store, vm_id = ctx.store, ctx.vm_id
        disks = await current_disks(ctx)
        async with journaled(ctx, "rebuild", name="", committed=False) as journal:
            found, kept, differences = await compare(
                store, vm_id, disks, ctx.qemu_img, search, by_chain=True
            )
            journal.passed("scanned")
            empty = not store.snapshots(vm_id)
            if not (apply or empty) or not differences:
                if not differences:
                    # The store agrees: this finishes a run killed after its commit.  (While
                    # they disagree, the sidecars are left as they are: only reported.)
                    store.sync_sidecars(vm_id)
                return RebuildReport(tuple(differences), applied=False, dropped=found.dropped)
            before = {s.name for s in store.snapshots(vm_id)}
            with store.atomic():
                if found.uid:
                    store.set_uid(vm_id, found.uid)
                _restore_vm_record(store, vm_id, found.vm, disks)
                store.replace_snapshots(vm_id, kept, crash=lambda: journal.passed("half-recorded"))
            journal.update(committed=True)
            journal.passed("committed")
            store.sync_sidecars(vm_id)
        added = tuple(s.name for s in kept if s.name not in before)
        return RebuildReport(tuple(differences), applied=True, added=added, dropped=found.dropped)


@recovers("rebuild")
async def recover_rebuild(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    """Before the commit: nothing happened (SQLite rolled back).  After: the sidecars."""
    if data.get("committed"):
        ctx.store.sync_sidecars(ctx.vm_id)


async def adopt(ctx: Context, *, timeout: float = DEFAULT_TIMEOUT) -> list[Snapshot]:
    """Add the snapshots the images hold that the store does not know (``adopted`` for tags
    another tool made).  Returns those added."""
    async with deadline(timeout, "adopt"), operation(ctx, "adopt"):
        return await adopt_missing(ctx.store, ctx.vm_id, await current_disks(ctx), ctx.qemu_img)


async def differences(ctx: Context, *, timeout: float = DEFAULT_TIMEOUT) -> list[Difference]:
    """How the store disagrees with the images and sidecars (``check`` reports them)."""
    async with deadline(timeout, "compare"):
        _, _, found = await compare(ctx.store, ctx.vm_id, await current_disks(ctx), ctx.qemu_img)
    return found


async def adopt_missing(
    store: Store, vm_id: int, disks: Sequence[Disk], qemu_img: QemuImg
) -> list[Snapshot]:
    """Add what the disks hold that the store does not know (``adopt``, first contact);
    nothing is removed.  Returns the snapshots added."""
    found = await discover(store, vm_id, disks, qemu_img)
    known = store.snapshots(vm_id)
    names = {s.name for s in known}
    described = [s for s in found.snapshots if not s.adopted and s.name not in names]
    has_current = any(s.current for s in known)
    with store.atomic():
        if found.uid and not known:
            store.set_uid(vm_id, found.uid)
            _restore_vm_record(store, vm_id, found.vm, disks)
        for snap in described:
            parent = snap.parent if snap.parent in names else None
            current = snap.current and not has_current
            store.add_snapshot(vm_id, attrs.evolve(snap, parent=parent), make_current=current)
            names.add(snap.name)
            has_current = has_current or current
        # Tags another tool made are placed by date among the snapshots the store knows.
        for snap in adopt_tags(found.tags, [d.name for d in disks], store.snapshots(vm_id)):
            store.add_snapshot(vm_id, snap, make_current=snap.current and not has_current)
    return [s for s in store.snapshots(vm_id) if s.name not in {k.name for k in known}]


def _restore_vm_record(
    store: Store, vm_id: int, vm: dict[str, Any] | None, disks: Sequence[Disk]
) -> None:
    """The disks' names, the recorded command line and which files qemusnap owns, from a
    sidecar."""
    if not vm:
        return
    # Opened cold, disks are named after their files ("a.s3" for a.s3.qcow2), but the
    # snapshots name them as they were named when taken: take those names back (by active
    # image, else by position).
    recorded = [d for d in vm.get("disks", []) if isinstance(d, dict)]
    by_file = {d.get("file"): d.get("name") for d in recorded}
    names = [by_file.get(d.file) for d in disks]
    if None in names and len(recorded) == len(disks):
        names = [d.get("name") for d in recorded]
    if all(isinstance(n, str) for n in names) and len(set(names)) == len(names):
        store.set_disks(
            vm_id, [DiskRecord(str(n), d.file, d.format) for n, d in zip(names, disks, strict=True)]
        )
    if vm.get("launch") and store.vm(vm_id).launch is None:
        store.set_vm_info(vm_id, launch=vm["launch"])
    # The sidecar's account beats the guess made on opening the disks (which took every
    # image under the active ones for a foreign backing file).
    for path, owned, role in vm.get("files", []):
        if os.path.exists(path):
            store.add_file(vm_id, path, owned=bool(owned), role=str(role))
