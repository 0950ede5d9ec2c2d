"""Pure planning for external snapshots: where overlays go, and how a frozen image is merged
away when its snapshot is deleted.  No I/O: the engine executes the steps (live or cold).

Images form a forest: every image has at most one backing image, and one image may back several
others (a branch after a revert).  An external snapshot freezes one image per disk; deleting the
snapshot merges that image away without changing what any other image reads:

* exactly one image depends on it: **commit** that dependent down into it (``block-commit``,
  an active commit with pivot when the dependent is the running disk; ``qemu-img commit``
  cold).  The frozen image then plays the dependent's role, and the dependent goes away.
  This also applies to the user's own base image: the disk becomes one image again.
* several depend on it: **pull** its data up into each (``block-stream`` / ``qemu-img rebase``
  onto its backing), then it goes away.
* none: it just goes away.

An image holding internal snapshots is never rebased or removed (its internal snapshots would
read different data, or vanish): such a plan is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection, Mapping

import attrs

from .errors import UnsupportedError


@attrs.frozen
class Commit:
    """Merge ``top`` into its backing image ``base``; ``top`` is gone afterwards and whatever
    referred to it (a snapshot, the running disk) refers to ``base``."""

    top: str
    base: str


@attrs.frozen
class Pull:
    """Copy ``old_backing``'s data into ``image`` and make ``new_backing`` its backing."""

    image: str
    old_backing: str
    new_backing: str | None


@attrs.frozen
class Rebind:
    """Point ``image``'s backing at ``new_backing``: same data, another file (``rebase -u``)."""

    image: str
    new_backing: str


@attrs.frozen
class Remove:
    path: str


Step = Commit | Pull | Rebind | Remove


@attrs.frozen
class ImageGraph:
    """Backing relations of every image qemusnap knows for one disk: image -> its backing."""

    backing: Mapping[str, str | None]

    def dependents(self, image: str) -> list[str]:
        return sorted(child for child, parent in self.backing.items() if parent == image)


def plan_merge_away(
    graph: ImageGraph,
    frozen: str,
    *,
    owned: Collection[str],
    holds_internal: Collection[str],
    protected: Collection[str] = (),
) -> list[Step]:
    """Steps that take ``frozen`` out of every chain without changing any other image's data.

    A file qemusnap did not create (the user's base image) is never removed: a single
    dependent is still committed into it (the disk is one image again, as after ``virsh
    snapshot-delete``), otherwise it simply stays the base of its chains.
    """
    if frozen in protected:
        # A backing file the VM came with (a template other VMs may share): never merged
        # into, rebased or removed; it simply stays below the chain.
        return []
    dependents = graph.dependents(frozen)
    if len(dependents) == 1 and dependents[0] in owned and dependents[0] not in holds_internal:
        (top,) = dependents
        # Commit keeps the internal snapshots of ``frozen`` (they own their clusters).
        rebinds: list[Step] = [Rebind(child, frozen) for child in graph.dependents(top)]
        return [Commit(top, frozen), *rebinds, Remove(top)]
    if frozen not in owned:
        return []
    if frozen in holds_internal:
        raise UnsupportedError(
            f"{frozen} holds internal snapshots: delete those first (merging it away would"
            " lose them)"
        )
    if not dependents:
        return [Remove(frozen)]
    blocked = [d for d in dependents if d in holds_internal]
    if blocked:
        raise UnsupportedError(
            f"{', '.join(blocked)} hold internal snapshots that read through {frozen}: delete"
            " those first"
        )
    new_backing = graph.backing.get(frozen)
    return [*(Pull(d, frozen, new_backing) for d in dependents), Remove(frozen)]


def dead_images(
    graph: ImageGraph, referenced: Collection[str], owned: Collection[str]
) -> list[str]:
    """Images qemusnap made that nothing needs: no snapshot or disk refers to them and none of
    those reads through them.  Removing them changes no data anyone can see."""
    needed: set[str] = set()
    for image in referenced:
        current: str | None = image
        while current is not None and current not in needed:
            needed.add(current)
            current = graph.backing.get(current)
    return sorted(p for p in graph.backing if p in owned and p not in needed)


def overlay_path(
    active: str, base: str, snapshot: str, exists: Callable[[str], bool] = os.path.lexists
) -> str:
    """Default place of a new overlay: beside the disk's active image, named after the chain's
    base image and the snapshot (``disk.s1.qcow2``), numbered if that name is taken."""
    directory = os.path.dirname(active)
    stem = file_part(os.path.basename(base).split(".")[0] or "disk", 64)
    label = file_part(snapshot, 120)
    candidate = os.path.join(directory, f"{stem}.{label}.qcow2")
    number = 1
    while exists(candidate):
        number += 1
        candidate = os.path.join(directory, f"{stem}.{label}.{number}.qcow2")
    return candidate


def file_part(name: str, limit: int) -> str:
    """``name`` as part of a file name: at most ``limit`` bytes (file names stop at 255
    bytes, snapshot names at 200 characters of any width); a shortened one gets a hash so two
    long names stay apart."""
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:10]
    cut = name.encode()[: limit - 11].decode(errors="ignore")
    return f"{cut}-{digest}"
