from __future__ import annotations

import pytest

from qemusnap.errors import UnsupportedError
from qemusnap.plan import (
    Commit,
    ImageGraph,
    Pull,
    Rebind,
    Remove,
    dead_images,
    overlay_path,
    plan_merge_away,
)

# base <- o1 <- o2 (active), and a branch base <- n1 (another snapshot's image)
GRAPH = ImageGraph({"base": None, "o1": "base", "o2": "o1", "n1": "base"})
OWNED = {"o1", "o2", "n1"}


def test_single_dependent_is_committed_down() -> None:
    assert plan_merge_away(GRAPH, "o1", owned=OWNED, holds_internal=()) == [
        Commit("o2", "o1"),
        Remove("o2"),
    ]


def test_commit_rebinds_the_children_of_the_top() -> None:
    graph = ImageGraph({"base": None, "o1": "base", "o2": "o1", "c1": "o2", "c2": "o2"})
    assert plan_merge_away(graph, "o1", owned={"o1", "o2", "c1", "c2"}, holds_internal=()) == [
        Commit("o2", "o1"),
        Rebind("c1", "o1"),
        Rebind("c2", "o1"),
        Remove("o2"),
    ]


def test_several_dependents_are_pulled_up() -> None:
    graph = ImageGraph({"base": None, "f": "base", "a": "f", "b": "f"})
    assert plan_merge_away(graph, "f", owned={"f", "a", "b"}, holds_internal=()) == [
        Pull("a", "f", "base"),
        Pull("b", "f", "base"),
        Remove("f"),
    ]


def test_user_base_is_never_removed() -> None:
    # Two branches on the user's base: nothing to do, it stays their base.
    assert plan_merge_away(GRAPH, "base", owned=OWNED, holds_internal=()) == []
    # One dependent: committed into the base, the disk is one image again.
    graph = ImageGraph({"base": None, "o1": "base"})
    assert plan_merge_away(graph, "base", owned={"o1"}, holds_internal=()) == [
        Commit("o1", "base"),
        Remove("o1"),
    ]


def test_unused_frozen_image_is_removed() -> None:
    graph = ImageGraph({"base": None, "o1": "base"})
    assert plan_merge_away(graph, "o1", owned={"o1"}, holds_internal=()) == [Remove("o1")]


def test_internal_snapshots_are_never_lost() -> None:
    graph = ImageGraph({"base": None, "f": "base", "a": "f", "b": "f"})
    with pytest.raises(UnsupportedError, match="internal"):
        plan_merge_away(graph, "f", owned={"f", "a", "b"}, holds_internal={"a"})
    with pytest.raises(UnsupportedError, match="internal"):
        plan_merge_away(graph, "f", owned={"f", "a", "b"}, holds_internal={"f"})
    # Committing into an image keeps its internal snapshots: allowed.
    assert plan_merge_away(GRAPH, "o1", owned=OWNED, holds_internal={"o1"})[0] == Commit("o2", "o1")


def test_overlay_path_is_next_free_name() -> None:
    taken = {"/d/vda.s1.qcow2", "/d/vda.s1.2.qcow2"}
    assert (
        overlay_path("/d/vda.qcow2", "/b/vda.qcow2", "s2", taken.__contains__) == "/d/vda.s2.qcow2"
    )
    assert (
        overlay_path("/d/x.qcow2", "/b/vda.qcow2", "s1", taken.__contains__) == "/d/vda.s1.3.qcow2"
    )


def test_dead_images_are_those_nothing_reads_through() -> None:
    # base <- a <- b (active);  base <- c <- d (left by a revert: nobody refers to c or d)
    graph = ImageGraph({"base": None, "a": "base", "b": "a", "c": "base", "d": "c"})
    owned = {"a", "b", "c", "d"}
    assert dead_images(graph, {"b"}, owned) == ["c", "d"]
    assert dead_images(graph, {"b", "c"}, owned) == ["d"]  # c is a snapshot's image
    assert dead_images(graph, set(), {"a"}) == ["a"]  # the user's base is never "dead"
