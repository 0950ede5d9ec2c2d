"""Delete snapshots (SPEC "Delete"), and the recovery of a delete killed halfway.

Internal snapshot (journal ``delete-internal``: ``name``, ``files``, ``reparent``): the tag is
removed from each image (``snapshot-delete`` job for images QEMU writes, ``qemu-img snapshot
-d`` for the others; ``tags-deleted``), then the snapshot is forgotten.  Killed halfway, the
tags still there are removed and the snapshot forgotten, its children reparented.

External snapshot (journal ``delete-external``: ``name``, ``reparent``; then ``steps`` (the
merge plan, :mod:`qemusnap.plan`) and ``done`` (how many ran)): each step (commit, pull,
rebind, remove) runs through QEMU when it has the image open, else with qemu-img
(:mod:`.merge`); ``done`` grows after each (``step-done``); the memory file is removed and the
snapshot forgotten.  Killed halfway, the remaining journaled steps run (the plan is not
computed again: after a commit it would differ and could strand the committed image).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

from ..aio import deadline
from ..errors import UnsupportedError
from ..faults import crashpoint
from ..models import Snapshot, SnapshotKind
from ..plan import Step
from ..tree import SnapshotTree, plan_delete
from .clone import clones, refuse_if_cloned
from .context import DEFAULT_TIMEOUT, Context
from .journal import Journal, journaled, operation, recovers
from .merge import merge_plans, run_step, step_from_json, step_to_json
from .shared import delete_internal_tags, live_nodes
from .shared import disks as current_disks


async def delete(
    ctx: Context,
    name: str,
    *,
    children: bool = False,
    children_only: bool = False,
    metadata_only: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[str]:
    """Delete snapshot ``name`` (see :meth:`qemusnap.VM.delete`)."""
    if children and children_only:
        raise UnsupportedError("--children and --children-only exclude each other")
    async with deadline(timeout, f"delete {name}"), operation(ctx, f"delete {name}"):
        tree = SnapshotTree.of(ctx.store.snapshots(ctx.record.id))
        plan = plan_delete(tree, name, children=children, children_only=children_only,
                           metadata_only=metadata_only)  # fmt: skip
        await refuse_cloned(ctx, [tree.get(victim) for victim in plan.remove])
        if metadata_only:
            # One transaction, not one per snapshot: --children can name thousands.
            ctx.store.remove_snapshots(ctx.record.id, plan.remove, {})
        for victim in () if metadata_only else plan.remove:
            snap = tree.get(victim)
            if snap.kind is SnapshotKind.INTERNAL:
                files = [d.file for d in snap.disks if d.file]
                await refuse_frozen_tags(ctx, snap)
                # The reparenting is journaled too: a recovery that finishes the delete
                # must not leave the children pointing at a snapshot that is gone.
                async with journaled(
                    ctx, "delete-internal", name=victim, files=files, reparent=plan.reparent
                ) as journal:
                    await delete_internal_tags(ctx, victim, files)
                    journal.passed("tags-deleted")
                    ctx.store.remove_snapshots(ctx.record.id, [victim], {})
            else:
                await merge_plans(ctx, snap)  # refuses what cannot be done, before any step
                async with journaled(
                    ctx, "delete-external", name=victim, reparent=plan.reparent
                ) as journal:
                    await delete_external(ctx, snap, journal)
        ctx.store.remove_snapshots(ctx.record.id, [], plan.reparent)
    return list(plan.remove)


async def refuse_cloned(ctx: Context, victims: Sequence[Snapshot]) -> None:
    """A delete that would change or remove a file a clone reads is refused, naming the
    clones (see :mod:`.clone`): the snapshot's images and memory file, and every image a step
    of its merge would write or remove."""
    if not any(c.in_use() for c in clones(ctx.store, ctx.record.id)):
        return  # the common case: nothing more to compute
    for snap in victims:
        files = {d.file for d in snap.disks if d.file}
        files.add(snap.memory_file or "")
        if snap.kind is SnapshotKind.EXTERNAL:
            plans: list[list[Step]] = []
            with contextlib.suppress(UnsupportedError):  # refused later, as without clones
                plans = await merge_plans(ctx, snap)
            for steps in plans:
                for step in steps:
                    files.update(getattr(step, f) for f in ("top", "base", "image", "path")
                                 if hasattr(step, f))  # fmt: skip
        refuse_if_cloned(ctx.store, ctx.record.id, snap.name, files)


async def refuse_frozen_tags(ctx: Context, snap: Snapshot) -> None:
    """Live, an internal snapshot inside an image QEMU reads as a backing file cannot be
    deleted (QEMU holds it read-only; qemu-img may not write it)."""
    if ctx.monitor is None:
        return
    active = {d.file for d in await current_disks(ctx)}
    nodes = await live_nodes(ctx)
    for d in snap.disks:
        if d.file and d.file not in active and d.file in nodes:
            raise UnsupportedError(
                f"{snap.name} is stored inside {d.file}, which the running VM reads as a"
                " backing file: delete it while the VM is stopped (--disk)"
            )


async def delete_external(ctx: Context, snap: Snapshot, journal: Journal) -> None:
    """Merge each disk's frozen image away (see :mod:`qemusnap.plan`), remove the memory
    file, forget the snapshot.  Recovery runs it again after a crash.

    The steps and how many are done are journaled: a plan computed again after a commit
    step would differ (the committed image still names its old backing file, the image
    above it already names the new one) and could strand the committed image.
    """
    if "steps" in journal.data:
        steps = [step_from_json(s) for s in journal.data["steps"]]
        done = int(journal.data.get("done", 0))
    else:
        steps = [step for plan in await merge_plans(ctx, snap) for step in plan]
        done = 0
        journal.update(steps=[step_to_json(s) for s in steps], done=0)
    for number, step in enumerate(steps[done:], start=done + 1):
        await run_step(ctx, step)
        journal.update(done=number)
        crashpoint("delete-external", "step-done")
    if snap.memory_file and ctx.store.is_owned(ctx.record.id, snap.memory_file):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(snap.memory_file)
        ctx.store.forget_file(ctx.record.id, snap.memory_file)
    ctx.store.remove_snapshots(ctx.record.id, [snap.name], {})


# --- recovery ---------------------------------------------------------------------------------


@recovers("delete-internal")
async def recover_delete_internal(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    """Still listed: finish the delete (tags, record, the children's new parent)."""
    name = data.get("name", "")
    if ctx.store.has_snapshot(ctx.record.id, name):
        await delete_internal_tags(ctx, name, data["files"])
        ctx.store.remove_snapshots(ctx.record.id, [name], data.get("reparent", {}))


@recovers("delete-external")
async def recover_delete_external(ctx: Context, data: dict[str, Any], journal: Journal) -> None:
    """Still listed: run the journaled merge steps not yet done, then forget it."""
    name = data.get("name", "")
    if ctx.store.has_snapshot(ctx.record.id, name):
        snap = SnapshotTree.of(ctx.store.snapshots(ctx.record.id)).get(name)
        await delete_external(ctx, snap, journal)
        ctx.store.remove_snapshots(ctx.record.id, [], data.get("reparent", {}))
