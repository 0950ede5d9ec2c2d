"""The command line: parse, call the async API once, render text or one JSON document."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import __version__
from .engine import VM
from .engine.rebuild import RebuildReport
from .errors import QemuSnapError, UnsupportedError, UsageError
from .models import Chain, CheckResult, Snapshot, SnapshotKind
from .store import Store

log = logging.getLogger("qemusnap.cli")


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Global options, accepted before the command and (for convenience) after it too."""
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--qmp",
        metavar="SOCKET",
        default=default,
        help="live mode: the QMP UNIX socket of a running QEMU",
    )
    parser.add_argument(
        "--disk",
        metavar="PATH",
        action="append",
        default=default,
        help="cold mode: a disk image of a stopped VM (repeat per disk)",
    )
    parser.add_argument(
        "--state",
        metavar="DIR",
        default=default,
        help="state directory (default: $QEMUSNAP_STATE or ~/.local/state/qemusnap)",
    )
    parser.add_argument(
        "--qga", metavar="SOCKET", default=default, help="qemu-guest-agent socket (for --quiesce)"
    )
    parser.add_argument(
        "--allow-other-user",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="drive a QEMU process owned by another user",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="machine-readable output (one JSON document)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS if suppress else 0,
        help="more logging; tracebacks on errors",
    )


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (exit 2), like every other error; --help still shows usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="qemusnap",
        description="Snapshots of QEMU/KVM virtual machines over QMP and qemu-img, no libvirt.",
    )
    parser.add_argument("--version", action="version", version=f"qemusnap {__version__}")
    _global_options(parser, suppress=False)
    common = _Parser(add_help=False)
    _global_options(common, suppress=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, description=help, parents=[common])

    create = command("create", "take a snapshot")
    create.add_argument("name")
    create.add_argument("--description", default="")
    create.add_argument("--disk-only", action="store_true", help="no memory state")
    where = create.add_mutually_exclusive_group()
    where.add_argument("--internal", action="store_true", help="inside the qcow2 images")
    where.add_argument("--external", action="store_true", help="new overlay images")
    create.add_argument("--memory-file", metavar="PATH", help="external checkpoint: RAM here")
    create.add_argument("--live", action="store_true", help="RAM saved while the guest runs")
    create.add_argument("--quiesce", action="store_true", help="freeze guest filesystems")
    create.add_argument("--halt", action="store_true", help="shut the VM off afterwards")
    create.add_argument("--exclude", metavar="DISK", action="append", default=[])
    create.add_argument("--overlay", metavar="DISK=PATH", action="append", default=[])
    create.add_argument("--reuse-external", action="store_true")

    listing = command("list", "list snapshots")
    listing.add_argument("--tree", action="store_true")
    ends = listing.add_mutually_exclusive_group()
    ends.add_argument("--roots", action="store_true")
    ends.add_argument("--leaves", action="store_true")
    kinds = listing.add_mutually_exclusive_group()
    kinds.add_argument("--internal", action="store_true")
    kinds.add_argument("--external", action="store_true")

    command("info", "show one snapshot").add_argument("name")
    command("current", "show the current snapshot")
    command("parent", "show a snapshot's parent").add_argument("name")

    revert = command("revert", "revert the VM to a snapshot")
    revert.add_argument("name")
    state = revert.add_mutually_exclusive_group()
    state.add_argument("--running", action="store_true")
    state.add_argument("--paused", action="store_true")
    revert.add_argument(
        "--force", action="store_true", help="allow losing the current running state"
    )

    delete = command("delete", "delete a snapshot")
    delete.add_argument("name")
    scope = delete.add_mutually_exclusive_group()
    scope.add_argument("--children", action="store_true")
    scope.add_argument("--children-only", action="store_true")
    delete.add_argument("--metadata-only", action="store_true")

    chain = command("chain", "show the backing chain of each disk")
    # dest: "disk" is the global --disk (cold mode) option.
    chain.add_argument("disk_name", nargs="?", metavar="DISK")
    check = command("check", "qemu-img check of every image of every chain")
    check.add_argument("--repair", choices=("leaks", "all"))
    command("recover", "repair what an interrupted operation left behind")
    command("adopt", "add snapshots found in the images that the state directory does not know")
    rebuild = command(
        "rebuild",
        "reconstruct the state directory's tree from the images, memory files and sidecars",
    )
    rebuild.add_argument(
        "--search",
        metavar="DIR",
        action="append",
        default=[],
        help="also look here for sidecars, overlays and memory files (repeat)",
    )
    rebuild.add_argument(
        "--apply",
        action="store_true",
        help="repair a state directory that disagrees with the disks (never the images)",
    )
    command("save", "memory-only save; the VM stops").add_argument("file")
    restore = command("restore", "start the VM again from a saved file")
    restore.add_argument("file")
    after = restore.add_mutually_exclusive_group()
    after.add_argument("--running", action="store_true")
    after.add_argument("--paused", action="store_true")
    clone = command(
        "clone",
        "start a new, independent VM from external checkpoint NAME (new overlays, the memory"
        " file read-only, its own QMP socket DIR/qmp.sock and state directory DIR/state)",
    )
    clone.add_argument("name")
    clone.add_argument("--to", required=True, metavar="DIR", help="absent or empty directory")
    clone.add_argument("--name", dest="clone_name", metavar="CLONE", help="default: DIR's name")
    clone.add_argument(
        "--net",
        metavar="ID=SPEC",
        action="append",
        default=[],
        help="replace network backend ID (-netdev id, or nicN/netN) that cannot be shared",
    )
    return parser


# --- rendering ----------------------------------------------------------------------------------


def _snapshot_text(snap: Snapshot) -> str:
    lines = [
        f"Name:         {snap.name}",
        f"Parent:       {snap.parent or '-'}",
        f"Current:      {'yes' if snap.current else 'no'}",
        f"Kind:         {snap.kind}",
        f"Memory:       {snap.memory}" + (f" ({snap.memory_file})" if snap.memory_file else ""),
        f"Consistency:  {snap.consistency}",
        f"VM state:     {snap.vm_state}",
        f"Created:      {snap.created}",
        f"Description:  {snap.description}",
    ]
    if snap.adopted:
        lines.append(
            "Adopted:      yes (found in the images)" + (", partial" if snap.partial else "")
        )
    lines += [f"Disk {d.name}:  {d.snapshot}  {d.file or ''}".rstrip() for d in snap.disks]
    return "\n".join(lines)


def _list_text(snaps: Sequence[Snapshot]) -> str:
    if not snaps:
        return "no snapshots"
    rows = [("Name", "Created", "Kind", "Memory", "Consistency", "State", "Parent")]
    rows += [
        (
            s.name
            + (" *" if s.current else "")
            + (" (adopted)" if s.adopted else "")
            + (" (partial)" if s.partial else ""),
            s.created,
            str(s.kind),
            str(s.memory),
            str(s.consistency),
            str(s.vm_state),
            s.parent or "-",
        )
        for s in snaps
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def _chain_json(chains: Sequence[Chain], roles: dict[str, tuple[bool, str]]) -> list[Any]:
    """``chain --json``, each image with ``owned``: whether qemusnap made it (and may merge
    into, rebase or remove it)."""
    document = [c.to_json() for c in chains]
    for chain in document:
        for image in chain["images"]:
            image["owned"] = roles.get(image["filename"], (False, ""))[0]
    return document


def _owner_text(path: str, roles: dict[str, tuple[bool, str]]) -> str:
    owned, role = roles.get(path, (False, ""))
    if owned:
        return ", qemusnap's"
    return ", shared backing file: never written" if role == "backing" else ", not qemusnap's"


def _chain_text(chains: Sequence[Chain], roles: dict[str, tuple[bool, str]] | None = None) -> str:
    lines: list[str] = []
    for chain in chains:
        lines.append(f"{chain.disk}:")
        for depth, image in enumerate(chain.images):
            tags = (
                f"  snapshots: {', '.join(s.name for s in image.snapshots)}"
                if image.snapshots
                else ""
            )
            lead = "  " + "    " * (depth - 1) + "└── " if depth else "  "
            lines.append(
                f"{lead}{image.filename} ({image.format}, {image.virtual_size} bytes"
                f"{_owner_text(image.filename, roles or {})}){tags}"
            )
    return "\n".join(lines)


def _check_text(results: Sequence[CheckResult]) -> str:
    def one(r: CheckResult) -> str:
        text = f"{r.filename}: {r.result}"
        if r.leaks or r.corruptions:
            text += f" ({r.leaks} leaked clusters, {r.corruptions} corruptions)"
        if r.leaks_fixed or r.corruptions_fixed:
            text += f", repaired {r.leaks_fixed} leaks and {r.corruptions_fixed} corruptions"
        return text

    return "\n".join(one(r) for r in results)


# --- running ------------------------------------------------------------------------------------


def _answers(socket_path: str) -> bool:
    """Whether something listens on the UNIX socket (a dead QEMU leaves none, or a stale
    file that refuses connections)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(socket_path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


async def _open(args: argparse.Namespace) -> VM:
    if args.qmp and args.command not in ("create", "save") and not _answers(args.qmp):
        # QEMU is gone (after "save", a crash, --halt): the socket path still names the VM,
        # which the other commands can handle cold ("revert" starts it again).
        with Store(args.state) as store:
            known = store.find_vm_by_socket(os.path.abspath(args.qmp))
        if known is not None:
            return await VM.cold([d.file for d in known.disks], state_dir=args.state)
    # rebuild reads the disks itself (with its --search directories): no adoption on opening.
    discover = args.command != "rebuild"
    if args.qmp:
        return await VM.attach(
            args.qmp,
            state_dir=args.state,
            qga_socket=args.qga,
            allow_other_user=args.allow_other_user,
            discover=discover,
        )
    if args.disk:
        return await VM.cold(args.disk, state_dir=args.state, discover=discover)
    # Neither: the one VM the state directory knows, live if its QMP socket still answers.
    with Store(args.state) as store:
        socket_path = store.sole_vm().qmp_socket
    if socket_path:
        try:
            return await VM.attach(
                socket_path, state_dir=args.state, qga_socket=args.qga, timeout=2.0
            )
        except QemuSnapError:
            log.debug("recorded QMP socket %s does not answer: cold mode", socket_path)
    return await VM.cold([], state_dir=args.state)


def _rebuild_text(report: RebuildReport) -> str:
    lines = [f"{d.snapshot or '(vm)'}: {d.what}: {d.detail}" for d in report.differences]
    if report.applied:
        lines.append(f"State directory rebuilt ({len(report.added)} snapshots added)")
    elif report.differences:
        lines.append("Not applied: the state directory has snapshots (use --apply to repair it)")
    else:
        lines.append("The state directory agrees with the disks")
    lines += [f"dropped (its data is gone): {name}" for name in report.dropped]
    return "\n".join(lines)


def _kind_text(snap: Snapshot) -> str:
    memory = {"none": "disk-only", "internal": "checkpoint", "file": "checkpoint"}[str(snap.memory)]
    return f"{snap.kind} {memory}, {snap.consistency}"


def _progress_printer() -> Callable[[int, int], None]:
    """Progress of a RAM write on the terminal (stderr), at most a few updates a second."""
    last = [0.0]

    def show(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] < 0.2:
            return
        last[0] = now
        mib = 1024 * 1024
        print(f"\rwriting memory: {done // mib} of ~{total // mib} MiB ", end="", file=sys.stderr)
        _progress_shown.append(True)

    return show


_progress_shown: list[bool] = []


def _parse_overlays(items: Sequence[str]) -> dict[str, str]:
    overlays: dict[str, str] = {}
    for item in items:
        disk, sep, path = item.partition("=")
        if not sep or not disk or not path:
            raise UnsupportedError(f"--overlay wants DISK=PATH, not {item!r}")
        overlays[disk] = path
    return overlays


async def _run(args: argparse.Namespace) -> Any:
    """Run one command; returns what to print: (json document, text)."""
    progress = _progress_printer() if sys.stderr.isatty() and not args.json else None
    async with await _open(args) as vm:
        if vm.store.journal(vm.record.id):
            # An interrupted operation: repaired by whatever command comes next, reading ones
            # included (mutating ones do it under their lock anyway).
            await vm.recover()
        match args.command:
            case "create":
                snap = await vm.create(
                    args.name,
                    description=args.description,
                    disk_only=args.disk_only,
                    internal=True if args.internal else False if args.external else None,
                    memory_file=args.memory_file,
                    live=args.live,
                    quiesce=args.quiesce,
                    halt=args.halt,
                    exclude=args.exclude,
                    overlays=_parse_overlays(args.overlay),
                    reuse_external=args.reuse_external,
                    progress=progress,
                )
                return snap.to_json(), f"Snapshot {snap.name} created ({_kind_text(snap)})"
            case "list":
                tree = vm.tree()
                kind = (
                    SnapshotKind.INTERNAL
                    if args.internal
                    else SnapshotKind.EXTERNAL
                    if args.external
                    else None
                )
                snaps = tree.filtered(roots=args.roots, leaves=args.leaves, kind=kind)
                if args.tree and (args.roots or args.leaves or kind is not None):
                    raise UsageError(
                        "--tree shows the whole tree: it does not combine with --roots,"
                        " --leaves, --internal or --external"
                    )
                text = tree.render() if args.tree else _list_text(snaps)
                return [s.to_json() for s in snaps], text or "no snapshots"
            case "info":
                snap = vm.info(args.name)
                return snap.to_json(), _snapshot_text(snap)
            case "current":
                current = vm.current()
                if current is None:
                    return None, "no current snapshot"
                return current.to_json(), current.name
            case "parent":
                parent = vm.parent(args.name)
                if parent is None:
                    return None, f"{args.name} has no parent"
                return parent.to_json(), parent.name
            case "revert":
                snap = await vm.revert(
                    args.name, running=args.running, paused=args.paused, force=args.force
                )
                return snap.to_json(), f"Reverted to {snap.name}"
            case "delete":
                removed = await vm.delete(
                    args.name,
                    children=args.children,
                    children_only=args.children_only,
                    metadata_only=args.metadata_only,
                )
                text = "Deleted " + ", ".join(removed) if removed else "Nothing to delete"
                return {"deleted": removed}, text
            case "chain":
                chains = await vm.chains(args.disk_name)
                roles = vm.store.file_roles(vm.record.id)
                return _chain_json(chains, roles), _chain_text(chains, roles)
            case "check":
                results = await vm.check(args.repair)
                # The store against the images and sidecars: each difference is one entry
                # (result "mismatch"); `rebuild --apply` repairs the store.
                differences = await vm.differences()
                checked = [r.to_json() for r in results] + [
                    {"filename": None, "result": "mismatch", **d.to_json()} for d in differences
                ]
                text = "\n".join(
                    [_check_text(results)]
                    + [f"store mismatch: {d.snapshot or '(vm)'}: {d.what}: {d.detail}"
                       for d in differences]
                )  # fmt: skip
                return checked, text
            case "adopt":
                added = await vm.adopt()
                text = "\n".join(f"Adopted {s.name} ({_kind_text(s)})" for s in added)
                return [s.to_json() for s in added], text or "Nothing to adopt"
            case "rebuild":
                report = await vm.rebuild(args.search, apply=args.apply)
                return report.to_json(), _rebuild_text(report)
            case "save":
                await vm.save(args.file, progress=progress)
                return {"saved": os.path.abspath(args.file)}, f"Saved to {args.file}; QEMU stopped"
            case "restore":
                await vm.restore(args.file, running=args.running, paused=args.paused)
                state = await vm.run_state()
                return {"restored": os.path.abspath(args.file), "vm_state": str(state)}, (
                    f"Restored from {args.file} ({state})"
                )
            case "clone":
                net = {}
                for item in args.net:
                    key, sep, spec = item.partition("=")
                    if not sep or not key or not spec:
                        raise UsageError(f"--net wants ID=SPEC, not {item!r}")
                    net[key] = spec
                clone = await vm.clone(args.name, args.to, name=args.clone_name, net=net)
                async with clone:  # closing it leaves the clone's QEMU running
                    document = {
                        "name": clone.record.name,
                        "qmp_socket": clone.qmp_socket,
                        "state_dir": str(clone.store.directory),
                        "pid": clone.monitor.peer_pid() if clone.monitor else None,
                        "disks": [{"name": d.name, "file": d.file} for d in clone.record.disks],
                    }
                return document, (
                    f"Clone {document['name']} of {args.name} runs (pid {document['pid']}),"
                    f" QMP socket {document['qmp_socket']}"
                )
            case "recover":
                await vm.recover()
                return {"recovered": True}, "State directory and images are consistent"
    raise UnsupportedError(f"unknown command {args.command}")  # pragma: no cover


async def _run_ending_progress(args: argparse.Namespace) -> Any:
    try:
        return await _run(args)
    finally:
        if _progress_shown:
            print(file=sys.stderr)


def _one_line(exc: BaseException) -> str:
    text = " ".join([str(exc), *getattr(exc, "__notes__", [])])
    return " ".join(text.split()) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.ERROR,
        format="qemusnap: %(message)s",
    )
    # qemu.qmp logs every failed connection at ERROR: only with -vv.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if args.verbose > 1 else logging.CRITICAL)
    try:
        document, text = asyncio.run(_run_ending_progress(args))
    except QemuSnapError as exc:
        if args.verbose:
            log.exception("failed")
        print(f"qemusnap: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # a bug: still one line, unless -v
        if args.verbose:
            log.exception("failed")
        print(f"qemusnap: internal error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qemusnap: interrupted", file=sys.stderr)
        return 130
    try:
        if args.json:
            print(json.dumps(document, indent=2))
        elif text:
            print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # `qemusnap list --json | head`: the reader left; the operation itself is done.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    return 0
