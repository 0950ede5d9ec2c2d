"""QEMU command lines, read and rewritten for a restart (pure: no I/O).

A revert or restore starts QEMU again from the command line it was first started with, each disk
pointed at its new image.  The new image is a qcow2 overlay (or a qcow2 clone) whatever the
original image was, so pointing the old option at the new path is not enough: an option that
said ``format=raw`` would let the guest read the overlay's qcow2 metadata as its disk, and write
its data into that metadata.  :func:`rewrite_images` therefore rewrites the *format layer* too,
in every way QEMU lets a command line open an image:

* ``-drive file=PATH,format=raw,...`` (``file.filename=``, ``driver=``, ``if=pflash`` alike);
* ``-blockdev`` in dotted syntax (``driver=raw,file.driver=file,file.filename=PATH``) and in JSON
  syntax, with the protocol node nested under ``file`` or a node of its own referenced by name
  (``-blockdev driver=file,node-name=f,filename=PATH -blockdev driver=raw,file=f``), or attached
  to a device (or ``-machine pflash1=``) with no format node at all;
* ``-hda``..``-hdd``, ``-fda``/``-fdb``, ``-sd``, ``-pflash``, ``-mtdblock``: these cannot carry a
  format, so they become the ``-drive`` QEMU makes of them (``vl.c``: ``drive_add()`` with
  ``HD_OPTS`` = ``media=disk`` and the option's index) plus ``format=qcow2``.

Options that face the guest or the host (``if``, ``index``, ``id``, ``cache``, ``aio``,
``discard``, ``detect-zeroes``, ``serial``, ``bootindex`` on ``-device``, ``file.locking``, ...)
stay as written.  Options of the raw format that change the guest's view (``offset``, ``size``)
cannot be carried over to a qcow2 overlay: that restart is refused.

QEMU option syntax: ``key=value`` pairs separated by commas, a literal comma doubled (``,,``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .errors import UnsupportedError

#: ``-hda``-style options: (``if=`` of the drive, index or None, extra options), as in QEMU's
#: ``vl.c`` (``HD_OPTS`` is ``media=disk``; ``-sd``/``-pflash``/``-mtdblock`` have no index).
_SHORT_DRIVES: dict[str, tuple[str | None, int | None, str]] = {
    "-hda": (None, 0, "media=disk"),
    "-hdb": (None, 1, "media=disk"),
    "-hdc": (None, 2, "media=disk"),
    "-hdd": (None, 3, "media=disk"),
    "-fda": ("floppy", 0, ""),
    "-fdb": ("floppy", 1, ""),
    "-sd": ("sd", None, ""),
    "-pflash": ("pflash", None, ""),
    "-mtdblock": ("mtd", None, ""),
}
#: Options of a format node that only the raw driver has and that change what the guest sees.
_RAW_VIEW_KEYS = ("offset", "size")
#: Node options that mean the same on a format node and its protocol node: kept on both when a
#: bare protocol node is wrapped in a qcow2 node.
_SHARED_NODE_KEYS = ("read-only", "auto-read-only", "force-share", "discard", "detect-zeroes")

Swap = Callable[[str], "str | None"]


# --- option syntax --------------------------------------------------------------------------


def split_opts(value: str) -> list[str]:
    """``a=1,b=x,,y`` -> ``["a=1", "b=x,y"]``: split on single commas, unescape ``,,``."""
    parts, current, i = [], [], 0
    while i < len(value):
        if value[i] == ",":
            if value[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(value[i])
        i += 1
    parts.append("".join(current))
    return parts


def join_opts(parts: Sequence[str]) -> str:
    """The inverse of :func:`split_opts`."""
    return ",".join(p.replace(",", ",,") for p in parts)


def parse_opts(value: str) -> list[tuple[str, str | None]]:
    """``driver=raw,readonly`` -> ``[("driver", "raw"), ("readonly", None)]`` (order kept)."""
    out: list[tuple[str, str | None]] = []
    for part in split_opts(value):
        key, sep, val = part.partition("=")
        out.append((key, val if sep else None))
    return out


def format_opts(pairs: Sequence[tuple[str, str | None]]) -> str:
    return join_opts([k if v is None else f"{k}={v}" for k, v in pairs])


def opts_dict(value: str) -> dict[str, str]:
    """``socket,id=x,fd=3`` -> {"": "socket", "id": "x", "fd": "3"} (a bare word is the
    option's implied value)."""
    out: dict[str, str] = {}
    for key, val in parse_opts(value):
        if val is None:
            out[""] = key
        else:
            out[key] = val
    return out


def _nest(pairs: Sequence[tuple[str, str | None]]) -> dict[str, Any]:
    """Dotted keyval (``file.driver=file``) as a tree of dicts, insertion order kept."""
    tree: dict[str, Any] = {}
    for key, val in pairs:
        node = tree
        *path, leaf = key.split(".")
        for part in path:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = val
    return tree


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for key, val in tree.items():
        if isinstance(val, dict):
            out += _flatten(val, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", val))
    return out


# --- what a command line says ---------------------------------------------------------------


def throwaway_overlays(argv: Sequence[str]) -> bool:
    """Whether QEMU runs with ``-snapshot`` (or a ``-drive snapshot=on``): it writes the
    guest's data into temporary overlays it deletes when it exits, so no snapshot qemusnap
    takes would survive a restart."""
    for i, arg in enumerate(argv):
        if arg == "-snapshot":
            return True
        if i and argv[i - 1] == "-drive" and opts_dict(arg).get("snapshot") in ("on", "yes"):
            return True
    return False


def image_paths(argv: Sequence[str], cwd: str) -> list[str]:
    """The absolute path of every image file ``argv`` opens (see :func:`rewrite_images`)."""
    found: list[str] = []

    def note(path: str) -> None:
        found.append(path)

    rewrite_images(argv, cwd, note)
    return found


# --- the rewrite ----------------------------------------------------------------------------


def replace_images(
    argv: Sequence[str], replace: Mapping[str, str], cwd: str, *, new_format: str = "qcow2"
) -> list[str]:
    """``argv`` with each image whose absolute path is a key of ``replace`` opened from the
    value instead, as a ``new_format`` image.  An entry mapping a path to itself changes
    nothing (that image is opened as before)."""

    def swap(path: str) -> str | None:
        new = replace.get(path)
        return new if new is not None and new != path else None

    return rewrite_images(argv, cwd, swap, new_format=new_format)


def rewrite_images(
    argv: Sequence[str], cwd: str, swap: Callable[[str], Any], *, new_format: str = "qcow2"
) -> list[str]:
    """``argv`` with each image path ``p`` (made absolute against ``cwd``) for which
    ``swap(p)`` returns a string opened from that path as a ``new_format`` image."""

    def new(path: str) -> str | None:
        got = swap(os.path.normpath(os.path.join(cwd, path)))
        return got if isinstance(got, str) else None

    out = list(argv)
    # Bare protocol nodes (-blockdev driver=file,node-name=N,filename=PATH) whose file changed:
    # the format node that names them as its "file" must become new_format; if none does, a
    # device (or -machine pflashN=) uses the bytes of the file directly, and the node itself
    # becomes a new_format node over it.
    bare: dict[str, int] = {}
    for i in range(1, len(argv)):
        option, arg = argv[i - 1], argv[i]
        if option == "-drive":
            out[i] = _rewrite_drive(arg, new, new_format)
        elif option in _SHORT_DRIVES:
            path = new(arg)
            if path is not None:
                out[i - 1], out[i] = "-drive", _short_drive(option, path, new_format)
        elif option == "-blockdev":
            is_json = arg.lstrip().startswith("{")
            tree = json.loads(arg) if is_json else _nest(parse_opts(arg))
            if _rewrite_node(tree, new, new_format) and isinstance(tree.get("node-name"), str):
                bare[tree["node-name"]] = i
            out[i] = _dump_node(tree, is_json)
    for name, i in bare.items():
        users = 0
        for j in range(1, len(out)):
            if argv[j - 1] != "-blockdev" or j == i:
                continue
            is_json = out[j].lstrip().startswith("{")
            tree = json.loads(out[j]) if is_json else _nest(parse_opts(out[j]))
            if _retarget_users(tree, name, new_format):
                users += 1
                out[j] = _dump_node(tree, is_json)
        if not users:
            is_json = out[i].lstrip().startswith("{")
            tree = json.loads(out[i]) if is_json else _nest(parse_opts(out[i]))
            out[i] = _dump_node(_wrap(tree, new_format), is_json)
    return out


def _dump_node(tree: Mapping[str, Any], is_json: bool) -> str:
    if is_json:
        return json.dumps(tree, separators=(",", ":"))
    return format_opts(_flatten(tree))


def _short_drive(option: str, path: str, new_format: str) -> str:
    interface, index, extra = _SHORT_DRIVES[option]
    pairs: list[tuple[str, str | None]] = [("file", path)]
    if interface:
        pairs.append(("if", interface))
    if index is not None:
        pairs.append(("index", str(index)))
    if extra:
        pairs += parse_opts(extra)
    pairs.append(("format", new_format))
    return format_opts(pairs)


def _rewrite_drive(value: str, new: Callable[[str], str | None], new_format: str) -> str:
    """One ``-drive``: its file (``file=`` or ``file.filename=``) and its format."""
    pairs = parse_opts(value)
    changed = False
    for n, (key, val) in enumerate(pairs):
        if key in ("file", "file.filename") and val and not val.startswith("json:"):
            path = new(val)
            if path is not None:
                pairs[n] = (key, path)
                changed = True
    if not changed:
        return value
    keys = [k for k, _ in pairs]
    driver_key = "driver" if "driver" in keys else "format"
    old_format = dict(pairs).get(driver_key)
    _refuse_raw_view(old_format, keys, value)
    if driver_key in keys:
        pairs = [(k, new_format if k == driver_key else v) for k, v in pairs]
    else:
        pairs.append(("format", new_format))
    # Backing options of the old image do not describe the new one (its backing file is
    # recorded in its header).
    pairs = [(k, v) for k, v in pairs if k != "backing" and not k.startswith("backing.")]
    return format_opts(pairs)


def _refuse_raw_view(driver: object, keys: Sequence[str], what: str) -> None:
    if driver == "raw" and any(k in keys for k in _RAW_VIEW_KEYS):
        raise UnsupportedError(
            f"cannot restart QEMU on a new image for {what!r}: its raw offset/size window"
            " cannot be carried over to a qcow2 overlay"
        )


def _rewrite_node(tree: dict[str, Any], new: Callable[[str], str | None], fmt: str) -> bool:
    """Rewrite a ``-blockdev`` tree in place.  True when ``tree`` itself is a protocol node
    whose file changed (the format layer is then elsewhere, or missing)."""
    filename = tree.get("filename")
    bare = False
    if isinstance(filename, str):
        path = new(filename)
        if path is not None:
            tree["filename"] = path
            bare = True
    for key, child in tree.items():
        if isinstance(child, dict) and _rewrite_node(child, new, fmt):
            if key == "file":
                _become_format(tree, fmt)
            else:
                # e.g. a "backing" child: the new image's own header names its backing file.
                raise UnsupportedError(
                    f"cannot restart QEMU on a new image: {child.get('filename')} is opened as"
                    f" the {key!r} child of a -blockdev node"
                )
    return bare


def _become_format(node: dict[str, Any], fmt: str) -> None:
    """Make ``node`` (a format node over a changed file) a ``fmt`` node."""
    _refuse_raw_view(node.get("driver"), list(node), json.dumps(node))
    node["driver"] = fmt
    node.pop("backing", None)  # the new image's header names its backing file


def _retarget_users(tree: dict[str, Any], name: str, fmt: str) -> bool:
    """Nodes of ``tree`` whose ``file`` is the node ``name``: made ``fmt`` nodes."""
    found = False
    if tree.get("file") == name:
        _become_format(tree, fmt)
        found = True
    for child in tree.values():
        if isinstance(child, dict):
            found = _retarget_users(child, name, fmt) or found
    return found


def _wrap(protocol: dict[str, Any], fmt: str) -> dict[str, Any]:
    """A ``fmt`` node named as ``protocol`` was, over ``protocol`` (now nameless)."""
    inner = {k: v for k, v in protocol.items() if k != "node-name"}
    outer: dict[str, Any] = {"driver": fmt}
    if "node-name" in protocol:
        outer["node-name"] = protocol["node-name"]
    for key in _SHARED_NODE_KEYS:
        if key in protocol:
            outer[key] = protocol[key]
    if isinstance(protocol.get("cache"), dict):
        outer["cache"] = dict(protocol["cache"])
    outer["file"] = inner
    return outer
