"""Pure adoption/rebuild logic (qemusnap.discover): tags across disks, places by date, the tree
the sidecars describe, and how a store differs from it."""

from __future__ import annotations

import attrs

from qemusnap.discover import (
    Described,
    DiskTags,
    adopt,
    diff,
    iso,
    match_tags,
    tree_from_sidecars,
)
from qemusnap.models import (
    Consistency,
    DiskSnapshot,
    DiskSnapshotKind,
    InternalSnapshotInfo,
    MemoryKind,
    Snapshot,
    SnapshotKind,
    VMState,
)

T0 = 1_700_000_000


def tag(name: str, date: int, vm_state: int = 0, id: str = "1") -> InternalSnapshotInfo:
    return InternalSnapshotInfo(id, name, vm_state, date, 0)


def snap(name: str, parent: str | None, created: int, **kw: object) -> Snapshot:
    return Snapshot(
        name=name,
        parent=parent,
        kind=SnapshotKind.INTERNAL,
        memory=MemoryKind.NONE,
        consistency=Consistency.CRASH,
        vm_state=VMState.SHUTOFF,
        created=iso(created),
        disks=(DiskSnapshot("a", DiskSnapshotKind.INTERNAL, "/a.qcow2"),),
        **kw,  # type: ignore[arg-type]
    )


def test_a_tag_on_every_qcow2_disk_is_one_snapshot_and_raw_disks_do_not_count() -> None:
    found = match_tags(
        [
            DiskTags("a", "/a.qcow2", "qcow2", (tag("both", T0 + 5), tag("only-a", T0 + 1))),
            DiskTags("b", "/b.qcow2", "qcow2", (tag("both", T0 + 4, vm_state=1000),)),
            DiskTags("r", "/r.raw", "raw"),
        ]
    )
    assert [f.name for f in found] == ["only-a", "both"]  # oldest first
    only, both = found
    assert only.partial and dict(only.files) == {"a": "/a.qcow2"}
    assert not both.partial and dict(both.files) == {"a": "/a.qcow2", "b": "/b.qcow2"}
    assert both.date_sec == T0 + 4 and both.vm_state_disk == "b"


def test_adopted_snapshots_hang_by_date_and_the_newest_complete_is_current() -> None:
    found = match_tags(
        [
            DiskTags(
                "a", "/a", "qcow2", (tag("t1", T0), tag("t2", T0 + 10, 99), tag("p", T0 + 20))
            ),
            DiskTags("b", "/b", "qcow2", (tag("t1", T0), tag("t2", T0 + 10))),
        ]
    )
    adopted = adopt(found, ["a", "b"], [])
    by_name = {s.name: s for s in adopted}
    assert [s.name for s in adopted] == ["t1", "t2", "p"]
    assert by_name["t1"].parent is None and by_name["t2"].parent == "t1"
    assert by_name["p"].parent == "t2" and by_name["p"].partial
    assert all(s.adopted for s in adopted)
    assert by_name["t2"].current and not by_name["t1"].current and not by_name["p"].current
    t2 = by_name["t2"]
    assert t2.memory is MemoryKind.INTERNAL and t2.consistency is Consistency.FULL
    assert t2.kind is SnapshotKind.INTERNAL and t2.vm_state is VMState.RUNNING
    assert by_name["t1"].memory is MemoryKind.NONE and by_name["t1"].vm_state is VMState.SHUTOFF
    assert [(d.name, d.snapshot) for d in by_name["p"].disks] == [
        ("a", DiskSnapshotKind.INTERNAL),
        ("b", DiskSnapshotKind.EXCLUDED),
    ]


def test_the_disk_holding_the_vm_state_comes_first() -> None:
    found = match_tags(
        [
            DiskTags("a", "/a", "qcow2", (tag("c", T0),)),
            DiskTags("b", "/b", "qcow2", (tag("c", T0, vm_state=4096),)),
        ]
    )
    (c,) = adopt(found, ["a", "b"], [])
    assert [d.name for d in c.disks] == ["b", "a"]


def test_adoption_skips_known_names_and_places_among_known_snapshots() -> None:
    known = [snap("ours", None, T0 + 5, current=True)]
    found = match_tags([DiskTags("a", "/a", "qcow2", (tag("ours", T0 + 5), tag("old", T0),
                                                        tag("new", T0 + 9)))])  # fmt: skip
    adopted = adopt(found, ["a"], known)
    assert [(s.name, s.parent) for s in adopted] == [("old", None), ("new", "ours")]
    assert not any(s.current for s in adopted)  # "ours" stays current


def described(s: Snapshot, seq: int, written: int = 0) -> Described:
    return Described(s, seq, written)


def test_sidecar_tree_drops_snapshots_whose_data_is_gone_and_moves_children_up() -> None:
    entries = [
        described(snap("r", None, T0), 1),
        described(snap("gone", "r", T0 + 1), 2),
        described(snap("kid", "gone", T0 + 2), 3),
        described(snap("cur", "kid", T0 + 3, current=True), 4, written=5),
    ]
    tree, dropped = tree_from_sidecars(reversed(entries), ["r", "kid", "cur"])
    assert [(s.name, s.parent) for s in tree] == [("r", None), ("kid", "r"), ("cur", "kid")]
    assert dropped == ["gone"]
    assert [s.name for s in tree if s.current] == ["cur"]


def test_two_sidecars_claiming_current_resolve_to_the_last_written() -> None:
    entries = [
        described(snap("x", None, T0, current=True), 1, written=10),
        described(snap("y", "x", T0 + 1, current=True), 2, written=20),
    ]
    tree, _ = tree_from_sidecars(entries, ["x", "y"])
    assert [s.name for s in tree if s.current] == ["y"]


def test_diff_names_every_difference() -> None:
    store = [snap("a", None, T0), snap("gone", "a", T0 + 1, current=True), snap("b", "a", T0 + 2)]
    found = [
        snap("a", None, T0),
        attrs.evolve(snap("b", "a", T0 + 2), description="changed"),
        snap("new", "b", T0 + 3, adopted=True, current=True),
    ]
    differences = {(d.snapshot, d.what) for d in diff(store, found)}
    assert differences == {
        ("gone", "only-in-store"),
        ("b", "differs"),
        ("new", "only-on-disk"),
        (None, "current"),
    }
    assert diff(found, found) == []
