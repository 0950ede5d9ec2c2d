"""Pure snapshot-tree logic: names, parents and children, filters, rendering.  No I/O.

The tree works like virsh's: a snapshot's parent is the snapshot that was current when it was
taken, and a revert makes its target current.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs

from .errors import InvalidNameError, SnapshotNotFoundError
from .models import Snapshot, SnapshotKind

MAX_NAME_LENGTH = 200


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid snapshot name, else raise :class:`InvalidNameError`."""
    if not name:
        raise InvalidNameError("invalid snapshot name: it is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidNameError(
            f"invalid snapshot name: {len(name)} characters, at most {MAX_NAME_LENGTH}"
        )
    if "/" in name:
        raise InvalidNameError(f"invalid snapshot name {name!r}: it contains '/'")
    if name.startswith("."):
        raise InvalidNameError(f"invalid snapshot name {name!r}: it starts with '.'")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidNameError(f"invalid snapshot name {name!r}: it contains control characters")
    return name


@attrs.frozen
class SnapshotTree:
    """An immutable view of one VM's snapshots, in creation order."""

    snapshots: tuple[Snapshot, ...]

    @classmethod
    def of(cls, snapshots: Iterable[Snapshot]) -> SnapshotTree:
        return cls(tuple(snapshots))

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(self.snapshots)

    def __len__(self) -> int:
        return len(self.snapshots)

    def __contains__(self, name: object) -> bool:
        return any(s.name == name for s in self.snapshots)

    def get(self, name: str) -> Snapshot:
        for snap in self.snapshots:
            if snap.name == name:
                return snap
        raise SnapshotNotFoundError(f"no snapshot named {name!r}")

    @property
    def current(self) -> Snapshot | None:
        return next((s for s in self.snapshots if s.current), None)

    def children(self, name: str | None) -> list[Snapshot]:
        """Direct children of ``name`` (of the roots' virtual parent when ``None``)."""
        return [s for s in self.snapshots if s.parent == name]

    def roots(self) -> list[Snapshot]:
        return self.children(None)

    def leaves(self) -> list[Snapshot]:
        parents = {s.parent for s in self.snapshots}
        return [s for s in self.snapshots if s.name not in parents]

    def descendants(self, name: str) -> list[Snapshot]:
        """Every snapshot below ``name``, parents before children."""
        found: list[Snapshot] = []
        frontier = [name]
        while frontier:
            kids = [s for s in self.snapshots if s.parent in frontier]
            found.extend(kids)
            frontier = [s.name for s in kids]
        return found

    def ancestors(self, name: str) -> list[Snapshot]:
        """Parent first, root last."""
        found: list[Snapshot] = []
        parent = self.get(name).parent
        while parent is not None:
            snap = self.get(parent)
            found.append(snap)
            parent = snap.parent
        return found

    def filtered(
        self,
        *,
        roots: bool = False,
        leaves: bool = False,
        kind: SnapshotKind | None = None,
    ) -> list[Snapshot]:
        chosen = self.roots() if roots else self.leaves() if leaves else list(self.snapshots)
        return [s for s in chosen if kind is None or s.kind is kind]

    def render(self) -> str:
        """An indented tree, like ``virsh snapshot-list --tree``."""
        lines: list[str] = []

        def walk(snap: Snapshot, prefix: str, last: bool, top: bool) -> None:
            mark = " *" if snap.current else ""
            what = "checkpoint" if snap.is_checkpoint else "disk-only"
            label = f"{snap.name}{mark}  [{snap.kind} {what}, {snap.consistency}]"
            lines.append(label if top else f"{prefix}{'└── ' if last else '├── '}{label}")
            kids = self.children(snap.name)
            inner = prefix if top else prefix + ("    " if last else "│   ")
            for i, kid in enumerate(kids):
                walk(kid, inner, i == len(kids) - 1, False)

        for root in self.roots():
            walk(root, "", True, True)
        return "\n".join(lines)


@attrs.frozen
class DeletePlan:
    """Which snapshots a delete removes, and where the survivors' parents move."""

    remove: tuple[str, ...]  # children before parents
    reparent: dict[str, str | None]
    metadata_only: bool


def plan_delete(
    tree: SnapshotTree,
    name: str,
    *,
    children: bool = False,
    children_only: bool = False,
    metadata_only: bool = False,
) -> DeletePlan:
    """virsh semantics: without ``children`` the deleted snapshot's children move to its parent."""
    target = tree.get(name)
    below = tree.descendants(name)
    if children or children_only:
        remove = [s.name for s in reversed(below)]
        if not children_only:
            remove.append(name)
        return DeletePlan(tuple(remove), {}, metadata_only)
    reparent = {kid.name: target.parent for kid in tree.children(name)}
    return DeletePlan((name,), reparent, metadata_only)
