"""Sidecar files: each snapshot describes itself in a small JSON file beside its data.

The SQLite store is qemusnap's working memory; it can be lost (a wiped ``/tmp``, a CI cache, a
new machine).  So every snapshot the store knows is mirrored into a sidecar file that lives
beside the data it describes, and ``qemusnap rebuild`` reads them back::

    <dir of the snapshot's first image>/.qemusnap/<hash of VM uid and name>.json   (0600)

The anchor is the image holding the snapshot's data for its first disk (the frozen image of an
external snapshot, the image holding the tag of an internal one); an image's directory is
where the data lives, and it survives whatever happens to the state directory.  The file name
is a hash (snapshot names may hold any character but ``/``, and two VMs may share a
directory); the real name is inside.  Each file holds the snapshot as ``list --json`` shows it,
its place in the tree (``seq``), whether it is current, and the VM's own record (its uid, disks,
recorded command line and which files qemusnap owns), so any one sidecar suffices to bring the
VM's record back.

Writes are atomic (a private temporary file, ``fsync``, ``rename``, ``fsync`` of the
directory): a reader sees the old sidecar or the new one, never half of one.  This module does
file I/O only; :class:`qemusnap.store.Store` decides what to write and when.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

DIRNAME = ".qemusnap"
FORMAT = "qemusnap-sidecar"
VERSION = 1


def path_for(anchor: str, vm_uid: str, name: str) -> str:
    """Where the sidecar of snapshot ``name`` of VM ``vm_uid`` anchored at ``anchor`` lives."""
    digest = hashlib.sha256(f"{vm_uid}\0{name}".encode()).hexdigest()[:24]
    return os.path.join(os.path.dirname(os.path.abspath(anchor)), DIRNAME, f"{digest}.json")


def _comparable(document: dict[str, Any], ignore: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k not in ("written", *ignore)}


def read(path: str) -> dict[str, Any] | None:
    """The sidecar at ``path``, or None if it is absent or not one of ours."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        return None
    return document


def write(path: str, document: dict[str, Any], *, ignore: tuple[str, ...] = ()) -> bool:
    """Write ``document`` to ``path`` atomically, mode 0600, unless it already says the same
    (``written`` and the keys in ``ignore`` aside).  Returns whether the file changed.
    Raises OSError."""
    document = {"format": FORMAT, "version": VERSION, **document}
    old = read(path)
    if old is not None and _comparable(old, ignore) == _comparable(document, ignore):
        return False
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temporary = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)  # a leftover of a killed writer with our pid
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(document, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_dir(directory)
    return True


def remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    directory = os.path.dirname(path)
    with contextlib.suppress(OSError):
        os.rmdir(directory)  # only when empty: the last sidecar of that directory went


def scan(directories: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Every sidecar in the ``.qemusnap`` folder of each directory: (path, document)."""
    found: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for directory in directories:
        folder = Path(directory) / DIRNAME
        if not folder.is_dir():
            continue
        for entry in sorted(folder.glob("*.json")):
            path = str(entry.resolve())
            if path in seen:
                continue
            seen.add(path)
            document = read(path)
            if document is not None:
                found.append((path, document))
    return found


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
