"""The delete plan runner: the merge steps that take an external snapshot's frozen image out
of every chain (planned by :mod:`qemusnap.plan`, pure), run live through QEMU's block jobs
where QEMU has the image open, else with qemu-img.  Journaling is the caller's
(:mod:`.delete`): a step may run twice after a crash, and each is safe to repeat."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import attrs

from ..errors import CommandError, OperationError
from ..models import Disk, DiskSnapshotKind, ImageInfo, Snapshot
from ..plan import Commit, ImageGraph, Pull, Rebind, Remove, Step, dead_images, plan_merge_away
from .context import DEFAULT_TIMEOUT, Context, job_id
from .shared import disks as current_disks
from .shared import image_format, live_nodes, referenced_files, refuse_in_use


async def merge_plans(ctx: Context, snap: Snapshot) -> list[list[Step]]:
    """The merge steps for each disk of external snapshot ``snap`` (disks' chains are
    disjoint, so they can be planned together)."""
    graph, holds_internal = await image_graph(ctx)
    owned = {p for p, mine in ctx.store.files(ctx.record.id).items() if mine}
    # Images nothing needs any more (e.g. those a revert or an earlier delete left with no
    # snapshot and no disk reading through them) go first, so no merge wastes effort on
    # them or leaves them behind.
    dead = dead_images(ImageGraph(graph), referenced_files(ctx), owned)
    # Backing files the VM came with (a template other VMs may share) are never written.
    protected = ctx.store.protected_files(ctx.vm_id)
    alive = ImageGraph({k: v for k, v in graph.items() if k not in dead})
    merges = [
        plan_merge_away(
            alive, d.file, owned=owned, holds_internal=holds_internal, protected=protected
        )
        for d in snap.disks
        if d.snapshot is DiskSnapshotKind.EXTERNAL and d.file and d.file in graph
    ]
    return [[Remove(p) for p in dead], *merges]


async def image_graph(ctx: Context) -> tuple[dict[str, str | None], set[str]]:
    """Backing file of every image this VM's snapshots and disks know, and which of them
    hold internal snapshots."""
    roles = ctx.store.owned_files(ctx.record.id)
    not_images = {p for p, role in roles.items() if role != "overlay"}
    not_images |= ctx.store.memory_files(ctx.record.id)
    saved = ctx.store.vm(ctx.record.id).saved
    if saved:
        not_images.add(saved["file"])
    known = set(ctx.store.files(ctx.record.id)) | referenced_files(ctx)
    known -= not_images
    images: dict[str, ImageInfo] = {}
    for disk in await current_disks(ctx):
        chain = await ctx.qemu_img.chain(disk.name, disk.file, force_share=True)
        images.update((image.filename, image) for image in chain.images)
    for path in sorted(known - images.keys()):
        if not os.path.exists(path):
            continue
        try:
            (images[path],) = await ctx.qemu_img.info(path, backing_chain=False, force_share=True)
        except OperationError:
            continue  # not an image (a memory file, a saved state)
    graph = {path: info.backing_filename for path, info in images.items()}
    holds_internal = {path for path, info in images.items() if info.snapshots}
    return graph, holds_internal


async def run_step(ctx: Context, step: Step) -> None:
    """One merge step, through QEMU when it has the image open, else with qemu-img."""
    nodes = await live_nodes(ctx) if ctx.monitor is not None else {}
    disks = await current_disks(ctx)
    match step:
        case Commit(top=top, base=base):
            if top in nodes and ctx.monitor is not None:
                active = next((d for d in disks if d.file == top), None)
                args: dict[str, Any] = {"base-node": nodes[base]}
                if active is not None:  # active commit: READY, then pivot to base
                    args["device"] = nodes[top]
                else:
                    args["device"] = await active_node_above(ctx, top, disks)
                    args["top-node"] = nodes[top]
                job = job_id("commit")
                await ctx.monitor.run_block_job(
                    "block-commit", {"job-id": job, **args}, job_id=job, timeout=DEFAULT_TIMEOUT
                )
            else:
                await refuse_in_use(ctx, [Disk(top, top, "qcow2")], "stop the VM first")
                await ctx.qemu_img.commit(top, keep_top=True)
            ctx.store.rename_references(ctx.record.id, top, base)
        case Pull(image=image, new_backing=new):
            if image in nodes and ctx.monitor is not None:
                job = job_id("stream")
                args = {"job-id": job, "device": nodes[image]}
                if new is not None:
                    args["base-node"] = nodes[new]
                await ctx.monitor.run_block_job(
                    "block-stream", args, job_id=job, timeout=DEFAULT_TIMEOUT
                )
            else:
                fmt = await image_format(ctx, new) if new else None
                await ctx.qemu_img.rebase(image, new, fmt)
        case Rebind(image=image, new_backing=new):
            (info,) = await ctx.qemu_img.info(image, backing_chain=False, force_share=True)
            if info.backing_filename != new:
                await ctx.qemu_img.rebase(image, new, await image_format(ctx, new), unsafe=True)
        case Remove(path=path):
            if ctx.monitor is not None and path in nodes:
                # Merged out of every chain, but a node opened by -blockdev/blockdev-add
                # stays open until it is deleted explicitly.
                try:
                    await ctx.monitor.execute("blockdev-del", {"node-name": nodes[path]})
                except CommandError as exc:
                    raise OperationError(f"QEMU still uses {path}: {exc}") from exc
            if ctx.store.is_owned(ctx.record.id, path):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                ctx.store.forget_file(ctx.record.id, path)


async def active_node_above(ctx: Context, image: str, disks: Sequence[Disk]) -> str:
    """The node name of the active image of the disk whose chain contains ``image``."""
    for disk in disks:
        chain = await ctx.qemu_img.chain(disk.name, disk.file, force_share=True)
        if image in {i.filename for i in chain.images} and disk.node_name:
            return disk.node_name
    raise OperationError(f"no running disk reads {image}")


def step_to_json(step: Step) -> dict[str, Any]:
    return {"step": type(step).__name__, **attrs.asdict(step)}


def step_from_json(data: dict[str, Any]) -> Step:
    kinds: dict[str, type[Step]] = {"Commit": Commit, "Pull": Pull, "Rebind": Rebind,
                                    "Remove": Remove}  # fmt: skip
    fields = {k: v for k, v in data.items() if k != "step"}
    return kinds[data["step"]](**fields)
