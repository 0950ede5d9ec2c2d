from __future__ import annotations

import pytest
from helpers import make_snapshot

from qemusnap.errors import InvalidNameError, SnapshotNotFoundError
from qemusnap.models import (
    Snapshot,
    SnapshotKind,
    VMState,
)
from qemusnap.tree import SnapshotTree, plan_delete, validate_name


def snap(
    name: str, parent: str | None, *, current: bool = False, external: bool = False
) -> Snapshot:
    return make_snapshot(
        name,
        parent,
        image="/x.qcow2",
        kind=SnapshotKind.EXTERNAL if external else SnapshotKind.INTERNAL,
        vm_state=VMState.RUNNING,
        current=current,
    )


# s1 ── s2 ── s3
#   └── s4 *
TREE = SnapshotTree.of(
    [
        snap("s1", None),
        snap("s2", "s1"),
        snap("s3", "s2"),
        snap("s4", "s1", current=True, external=True),
    ]
)


@pytest.mark.parametrize("name", ["", "a/b", ".x", "x" * 201, "a\nb", "tab\there", "del\x7f"])
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidNameError):
        validate_name(name)


@pytest.mark.parametrize("name", ["s1", "x" * 200, "with space", "ünï", "a.b", "-dash"])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


def test_relations() -> None:
    assert [s.name for s in TREE.roots()] == ["s1"]
    assert [s.name for s in TREE.leaves()] == ["s3", "s4"]
    assert [s.name for s in TREE.children("s1")] == ["s2", "s4"]
    assert [s.name for s in TREE.descendants("s1")] == ["s2", "s4", "s3"]
    assert [s.name for s in TREE.ancestors("s3")] == ["s2", "s1"]
    assert TREE.current is not None and TREE.current.name == "s4"
    assert [s.name for s in TREE.filtered(kind=SnapshotKind.EXTERNAL)] == ["s4"]
    assert [s.name for s in TREE.filtered(leaves=True, kind=SnapshotKind.INTERNAL)] == ["s3"]
    with pytest.raises(SnapshotNotFoundError):
        TREE.get("nope")


def test_render_marks_current_and_nests() -> None:
    text = TREE.render()
    assert text.splitlines()[0].startswith("s1  [internal")
    assert "├── s2" in text and "└── s4 *" in text
    # s3, s2's only child, continues s2's column: no branch mark, no extra indent.
    assert text.splitlines()[2].startswith("│   s3  [internal")


def test_delete_reparents_children_to_parent() -> None:
    plan = plan_delete(TREE, "s2")
    assert plan.remove == ("s2",)
    assert plan.reparent == {"s3": "s1"}
    root = plan_delete(TREE, "s1")
    assert root.reparent == {"s2": None, "s4": None}


def test_delete_children_removes_leaves_first() -> None:
    assert plan_delete(TREE, "s1", children=True).remove == ("s3", "s4", "s2", "s1")
    assert plan_delete(TREE, "s1", children_only=True).remove == ("s3", "s4", "s2")
