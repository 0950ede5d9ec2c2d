"""The pure core at scale: 10,000-node trees (issue 16).

A harness that snapshots every test step builds long histories; recursion or a rescan of the
whole list per node made ``list --tree`` crash at 1,000 snapshots in a line.  Every test here
runs far past Python's recursion limit and under a time bound a quadratic walk cannot meet.
"""

from __future__ import annotations

import sys
import time

from qemusnap.plan import ImageGraph, dead_images, plan_merge_away
from qemusnap.tree import RENDER_MAX_INDENT, SnapshotTree, plan_delete
from tests.unit.test_tree import snap

N = 10_000


def line(n: int = N) -> SnapshotTree:
    """s0 <- s1 <- ... <- s(n-1), the last one current."""
    return SnapshotTree.of(
        snap(f"s{i}", f"s{i - 1}" if i else None, current=i == n - 1) for i in range(n)
    )


def comb(n: int = N) -> SnapshotTree:
    """A spine t0 <- t1 <- ... where each spine node also has a leaf: revert-and-retry."""
    snaps = []
    for i in range(n // 2):
        snaps.append(snap(f"t{i}", f"t{i - 1}" if i else None))
        snaps.append(snap(f"leaf{i}", f"t{i}"))
    return SnapshotTree.of(snaps)


def test_depth_is_past_the_recursion_limit() -> None:
    assert sys.getrecursionlimit() < N


def test_relations_of_a_deep_line_are_linear() -> None:
    tree = line()
    began = time.perf_counter()
    assert [s.name for s in tree.roots()] == ["s0"]
    assert [s.name for s in tree.leaves()] == [f"s{N - 1}"]
    assert len(tree.ancestors(f"s{N - 1}")) == N - 1
    assert tree.ancestors(f"s{N - 1}")[-1].name == "s0"
    below = tree.descendants("s0")
    assert [s.name for s in below] == [f"s{i}" for i in range(1, N)]
    assert all(tree.get(f"s{i}").name == f"s{i}" for i in range(N))
    assert f"s{N // 2}" in tree and "nope" not in tree
    assert tree.current is not None and tree.current.name == f"s{N - 1}"
    # A quadratic walk does 10^8 steps here: many seconds, not a fraction of one.
    assert time.perf_counter() - began < 2.0


def test_render_of_a_deep_line_is_a_column() -> None:
    tree = line()
    began = time.perf_counter()
    text = tree.render()
    assert time.perf_counter() - began < 2.0
    rows = text.splitlines()
    assert len(rows) == N
    assert rows[0].startswith("s0  [") and rows[-1].startswith(f"s{N - 1} *  [")
    # Linear in size: no row is indented (one column for a line of snapshots).
    assert all(r.startswith("s") for r in rows)
    assert len(text) < 60 * N


def test_render_of_a_comb_keeps_every_node_in_order() -> None:
    tree = comb()
    began = time.perf_counter()
    text = tree.render()
    assert time.perf_counter() - began < 2.0
    # Indentation stops at RENDER_MAX_INDENT levels: the size stays linear.
    assert max(len(r) for r in text.splitlines()) < 4 * RENDER_MAX_INDENT + 60
    blocks = text.split("\n\n")
    assert len(blocks) > 1
    assert all(b.startswith("… t") for b in blocks[1:])
    rows = [r for b in blocks for r in b.splitlines()[(1 if b.startswith("…") else 0) :]]
    assert len(rows) == N
    names = [r.lstrip("│├└─ ").split()[0] for r in rows]
    assert sorted(names) == sorted(s.name for s in tree)
    # Each parent is drawn before its children.
    pos = {name: i for i, name in enumerate(names)}
    assert all(s.parent is None or pos[s.parent] < pos[s.name] for s in tree)


def test_render_continues_a_deep_subtree_under_its_parent() -> None:
    tree = comb(2 * (RENDER_MAX_INDENT + 2))
    blocks = tree.render().split("\n\n")
    last = f"t{RENDER_MAX_INDENT}"
    assert blocks[0].splitlines()[-1].endswith(f"── {last}  [internal disk-only, crash]")
    assert blocks[1].splitlines()[:3] == [
        f"… {last}  [internal disk-only, crash]",
        f"├── leaf{RENDER_MAX_INDENT}  [internal disk-only, crash]",
        f"└── t{RENDER_MAX_INDENT + 1}  [internal disk-only, crash]",
    ]


def test_render_several_roots_one_block_each() -> None:
    tree = SnapshotTree.of([snap("a", None), snap("a1", "a"), snap("b", None)])
    assert tree.render().split("\n\n") == [
        "a  [internal disk-only, crash]\na1  [internal disk-only, crash]",
        "b  [internal disk-only, crash]",
    ]


def test_delete_planning_in_a_deep_line() -> None:
    tree = line()
    began = time.perf_counter()
    middle = plan_delete(tree, f"s{N // 2}")
    assert middle.remove == (f"s{N // 2}",)
    assert middle.reparent == {f"s{N // 2 + 1}": f"s{N // 2 - 1}"}
    everything = plan_delete(tree, "s0", children=True)
    assert everything.remove == tuple(f"s{i}" for i in reversed(range(N)))
    below = plan_delete(tree, "s0", children_only=True)
    assert below.remove == tuple(f"s{i}" for i in reversed(range(1, N)))
    assert time.perf_counter() - began < 2.0


def test_delete_planning_in_a_comb() -> None:
    tree = comb()
    plan = plan_delete(tree, "t0", children=True)
    assert len(plan.remove) == N
    pos = {name: i for i, name in enumerate(plan.remove)}
    # Children before parents.
    assert all(s.parent is None or pos[s.name] < pos[s.parent] for s in tree)


def test_a_parent_loop_does_not_hang() -> None:
    # A damaged store could name each other as parents; walks must end.
    tree = SnapshotTree.of([snap("x", "y"), snap("y", "x")])
    assert [s.name for s in tree.ancestors("x")] == ["y"]
    assert [s.name for s in tree.descendants("x")] == ["y"]
    assert tree.render() == ""


def test_image_chain_walks_of_a_deep_chain() -> None:
    backing: dict[str, str | None] = {f"/i{i}": f"/i{i - 1}" if i else None for i in range(N)}
    graph = ImageGraph(backing)
    owned = set(backing) - {"/i0"}
    began = time.perf_counter()
    assert dead_images(graph, [f"/i{N - 1}"], owned) == []
    assert dead_images(graph, [f"/i{N // 2}"], owned) == sorted(
        f"/i{i}" for i in range(N // 2 + 1, N)
    )
    steps = plan_merge_away(graph, f"/i{N // 2}", owned=owned, holds_internal=())
    assert [type(s).__name__ for s in steps] == ["Commit", "Rebind", "Remove"]
    assert time.perf_counter() - began < 2.0
