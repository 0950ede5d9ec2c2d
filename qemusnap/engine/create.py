"""Create: what a ``create`` call asks for (SPEC "Create"), checked before anything is done,
then handed to the room of its kind: :mod:`.create_internal` or :mod:`.create_external`
(each with its journal steps and its recovery)."""

from __future__ import annotations

from collections.abc import Iterable

from ..aio import deadline
from ..errors import SnapshotExistsError, UnsupportedError
from ..memory import Progress
from ..models import Snapshot
from ..tree import validate_name
from .context import DEFAULT_TIMEOUT, Context
from .create_external import create_external
from .create_internal import create_internal
from .journal import operation
from .restart import stop_qemu
from .shared import disks as current_disks
from .shared import find_disk, refuse_in_use


async def create(
    ctx: Context,
    name: str,
    *,
    description: str = "",
    disk_only: bool = False,
    internal: bool | None = None,
    memory_file: str | None = None,
    live: bool = False,
    quiesce: bool = False,
    halt: bool = False,
    exclude: Iterable[str] = (),
    overlays: dict[str, str] | None = None,
    reuse_external: bool = False,
    progress: Progress | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Snapshot:
    """Take snapshot ``name`` (see :meth:`qemusnap.VM.create`)."""
    validate_name(name)
    exclude, overlays = set(exclude), dict(overlays or {})
    external = internal is False or memory_file is not None or (disk_only and not internal)
    with_memory = ctx.live and not disk_only
    check_create_flags(
        ctx, external, with_memory, internal, memory_file, live, quiesce, overlays, reuse_external
    )
    async with deadline(timeout, f"create {name}"), operation(ctx, f"create {name}"):
        if ctx.store.has_snapshot(ctx.record.id, name):
            raise SnapshotExistsError(f"a snapshot named {name!r} exists already")
        disks = await current_disks(ctx)
        for disk_name in [*exclude, *overlays]:
            find_disk(disks, disk_name)
        chosen = [d for d in disks if d.name not in exclude]
        if not chosen:
            raise UnsupportedError("no disk left to snapshot")
        if not ctx.live:
            await refuse_in_use(ctx, chosen, "use --qmp SOCKET for a live snapshot")
        if external:
            snap = await create_external(
                ctx, name, chosen, disks, description, with_memory, memory_file, live, quiesce,
                overlays, reuse_external, halt, progress,
            )  # fmt: skip
        else:
            snap = await create_internal(ctx, name, chosen, disks, description, with_memory,
                                         quiesce)  # fmt: skip
        if halt and ctx.monitor is not None:
            await stop_qemu(ctx)
    return snap


def check_create_flags(
    ctx: Context,
    external: bool,
    with_memory: bool,
    internal: bool | None,
    memory_file: str | None,
    live: bool,
    quiesce: bool,
    overlays: dict[str, str],
    reuse_external: bool,
) -> None:
    if internal and memory_file is not None:
        raise UnsupportedError("--internal and --memory-file exclude each other")
    if memory_file is not None and not ctx.live:
        raise UnsupportedError(
            "--memory-file needs a running VM (--qmp): a stopped VM has no memory"
        )
    if live and not (external and with_memory):
        raise UnsupportedError("--live applies to external checkpoints (--memory-file)")
    if (overlays or reuse_external) and not external:
        raise UnsupportedError("--overlay and --reuse-external apply to external snapshots")
    if reuse_external and not overlays:
        raise UnsupportedError("--reuse-external needs --overlay DISK=PATH for each disk")
    if quiesce and with_memory:
        raise UnsupportedError(
            "--quiesce applies to disk-only snapshots (a checkpoint saves memory too)"
        )
    if quiesce and not ctx.live:
        raise UnsupportedError("--quiesce needs a running VM (--qmp) and its guest agent")
    if quiesce and not ctx.qga_socket:
        raise UnsupportedError("--quiesce needs the guest agent socket (--qga SOCKET)")
