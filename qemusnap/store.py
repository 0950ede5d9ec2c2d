"""The state directory: snapshot metadata (SQLite), the operation journal, per-VM locks.

Layout of a state directory::

    qemusnap.db              SQLite (WAL): vms, disks, snapshots, owned files, journal
    locks/vm-<id>.lock       flock()ed by the one operation running on that VM
    vms/<id>/memory/         default place of memory files (mode 0700)

The store is qemusnap's memory of what it did; the images are the truth about data.  Every
multi-step operation writes a journal entry before its first irreversible step and removes it
when done, so the next command finds an interrupted one (see ``Engine.recover``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from . import sidecar
from .errors import (
    BusyError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    StoreError,
    VMNotFoundError,
)
from .models import (
    DiskSnapshot,
    Snapshot,
)

SCHEMA_VERSION = 3

log = logging.getLogger("qemusnap.store")

#: Columns added after version 1 (ALTER TABLE on an older state directory).
_ADDED_COLUMNS = (
    ("vms", "uid", "TEXT"),  # a VM's identity in its snapshots' sidecar files
    ("snapshots", "adopted", "INTEGER NOT NULL DEFAULT 0"),
    ("snapshots", "partial", "INTEGER NOT NULL DEFAULT 0"),
    # How to read a memory file back (NULL: a stream), the machine type it needs (NULL: unknown).
    ("snapshots", "memory_format", "TEXT"),
    ("snapshots", "machine_type", "TEXT"),
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    created TEXT NOT NULL,
    current TEXT,                 -- name of the current snapshot (virsh's "current")
    qmp_socket TEXT,              -- last QMP socket seen for this VM
    launch TEXT,                  -- JSON: how to start this VM again (argv, ...), or NULL
    saved TEXT                    -- JSON: the last memory-only save ("save FILE"), or NULL
);
CREATE TABLE IF NOT EXISTS disks (
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    file TEXT NOT NULL,           -- the active image
    format TEXT NOT NULL,
    PRIMARY KEY (vm_id, name)
);
CREATE TABLE IF NOT EXISTS snapshots (
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    parent TEXT,
    kind TEXT NOT NULL,
    memory TEXT NOT NULL,
    memory_file TEXT,
    consistency TEXT NOT NULL,
    vm_state TEXT NOT NULL,
    created TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    disks TEXT NOT NULL,          -- JSON list of DiskSnapshot
    memory_format TEXT,           -- stream | mapped-ram (NULL: stream, or no memory file)
    machine_type TEXT,            -- -machine value the checkpoint ran on (NULL: unknown)
    PRIMARY KEY (vm_id, name)
);
CREATE INDEX IF NOT EXISTS snapshots_by_seq ON snapshots (vm_id, seq);
CREATE TABLE IF NOT EXISTS files (
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    owned INTEGER NOT NULL,       -- 1: qemusnap created it and may delete it
    role TEXT NOT NULL,           -- base | overlay | memory
    PRIMARY KEY (vm_id, path)
);
CREATE TABLE IF NOT EXISTS sidecars (
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    name TEXT NOT NULL,           -- a snapshot's name
    path TEXT NOT NULL,           -- where its sidecar file was last written (see sidecar.py)
    PRIMARY KEY (vm_id, name)
);
CREATE TABLE IF NOT EXISTS image_cache (  -- what qemu-img said about an image (issue 16)
    path TEXT PRIMARY KEY,
    stat TEXT NOT NULL,           -- dev:ino:size:mtime_ns:ctime_ns when it was true
    info TEXT,                    -- qemu-img info JSON of the image alone, or NULL (tags only)
    tags TEXT NOT NULL            -- JSON [[id or null, name], ...]: its internal snapshots
);
CREATE TABLE IF NOT EXISTS journal (
    id INTEGER PRIMARY KEY,
    vm_id INTEGER NOT NULL REFERENCES vms(id) ON DELETE CASCADE,
    operation TEXT NOT NULL,
    started TEXT NOT NULL,
    pid INTEGER NOT NULL,
    data TEXT NOT NULL            -- JSON, grows as the operation goes
);
"""


def default_state_dir() -> Path:
    """``$QEMUSNAP_STATE``, else ``$XDG_STATE_HOME/qemusnap``, else ``~/.local/state/qemusnap``."""
    if env := os.environ.get("QEMUSNAP_STATE"):
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "qemusnap"


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@attrs.frozen
class DiskRecord:
    name: str
    file: str
    format: str


@attrs.frozen
class VMRecord:
    id: int
    name: str
    current: str | None
    qmp_socket: str | None
    launch: dict[str, Any] | None
    disks: tuple[DiskRecord, ...]
    saved: dict[str, Any] | None = None
    uid: str = ""


@attrs.frozen
class JournalEntry:
    id: int
    vm_id: int
    operation: str
    started: str
    pid: int
    data: dict[str, Any]


class Store:
    """One state directory.  Synchronous: every call is a short SQLite transaction."""

    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_state_dir()
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.directory / "locks").mkdir(mode=0o700, exist_ok=True)
            database = self.directory / "qemusnap.db"
            # Created private: SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(database, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(database, timeout=30, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._depth = 0
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self._migrate()
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            #: Sidecars to bring in line after the current transaction: per VM, the names of
            #: the snapshots whose sidecar may have changed, or None: all of them.
            self._dirty: dict[int, set[str] | None] = {}
            self._syncing = False
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"state directory {self.directory} is unusable: {exc}") from exc

    def _migrate(self) -> None:
        # One write transaction: two processes opening an old state directory at once must not
        # both add a column (the second ALTER TABLE would fail with "duplicate column").
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, column, declaration in _ADDED_COLUMNS:
                present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in present:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")
            self._db.execute("UPDATE vms SET uid=lower(hex(randomblob(8))) WHERE uid IS NULL")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; nested calls join the outer one (see :meth:`atomic`)."""
        if self._depth:
            self._depth += 1
            try:
                yield self._db
            finally:
                self._depth -= 1
            return
        try:
            self._db.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            self._dirty.clear()
            raise StoreError(f"state database error: {exc}") from exc
        self._mirror()

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """Group several updates (a snapshot, its disks, its files) into one transaction."""
        with self._tx():
            yield

    # --- VMs ------------------------------------------------------------------------------

    def vms(self) -> list[VMRecord]:
        rows = self._db.execute("SELECT id FROM vms ORDER BY id").fetchall()
        return [self.vm(row["id"]) for row in rows]

    def vm(self, vm_id: int) -> VMRecord:
        row = self._db.execute("SELECT * FROM vms WHERE id=?", (vm_id,)).fetchone()
        if row is None:
            raise StoreError(f"no VM {vm_id} in {self.directory}")
        disks = tuple(
            DiskRecord(d["name"], d["file"], d["format"])
            for d in self._db.execute(
                "SELECT * FROM disks WHERE vm_id=? ORDER BY position", (vm_id,)
            )
        )
        return VMRecord(
            id=row["id"],
            name=row["name"],
            current=row["current"],
            qmp_socket=row["qmp_socket"],
            launch=json.loads(row["launch"]) if row["launch"] else None,
            disks=disks,
            saved=json.loads(row["saved"]) if row["saved"] else None,
            uid=row["uid"] or "",
        )

    def find_vm(self, files: Iterable[str]) -> VMRecord | None:
        """The VM that owns or uses any of these image files (active, base or overlay)."""
        files = list(files)
        if not files:
            return None
        marks = ",".join("?" * len(files))
        rows = self._db.execute(
            f"SELECT DISTINCT vm_id FROM files WHERE path IN ({marks}) "
            f"UNION SELECT DISTINCT vm_id FROM disks WHERE file IN ({marks})",
            [*files, *files],
        ).fetchall()
        ids = sorted({r[0] for r in rows})
        if len(ids) > 1:
            raise StoreError(f"images {files} belong to several VMs in {self.directory}: {ids}")
        return self.vm(ids[0]) if ids else None

    def sole_vm(self) -> VMRecord:
        """The VM meant when a command names none: the only one, or the only one with
        snapshots (a disk merely looked at once does not count)."""
        every = self.vms()
        busy = [vm for vm in every if vm.saved or self.snapshots(vm.id)]
        for candidates in (every, busy):
            if len(candidates) == 1:
                return candidates[0]
        raise VMNotFoundError(
            f"the state directory {self.directory} knows {len(every)} VMs:"
            " name one with --qmp SOCKET or --disk PATH"
        )

    def find_vm_by_socket(self, qmp_socket: str) -> VMRecord | None:
        """The VM last seen behind this QMP socket path (its QEMU may be gone since)."""
        row = self._db.execute(
            "SELECT id FROM vms WHERE qmp_socket=? ORDER BY id DESC", (qmp_socket,)
        ).fetchone()
        return self.vm(row[0]) if row else None

    def find_or_add_vm(
        self, name: str, disks: Sequence[DiskRecord], chain_files: Iterable[str]
    ) -> VMRecord:
        """The VM with these disks (by active image, else by any image of their chains),
        with its disks updated; made if new.  One transaction: two first commands on the
        same new disks at once still make one VM."""
        chain_files = list(chain_files)
        with self._tx() as db:
            record = self.find_vm([d.file for d in disks]) or self.find_vm(chain_files)
            if record is None:
                return self.add_vm(name, disks, chain_files)
            self._write_disks(db, record.id, disks)
        return self.vm(record.id)

    def add_vm(self, name: str, disks: Iterable[DiskRecord], base_files: Iterable[str]) -> VMRecord:
        """A new VM.  ``base_files``: every image of its disks' chains when first seen; those
        below the active images are backing files someone else made (a template other VMs may
        share): role ``backing``, never merged into, rebased or removed."""
        disks = list(disks)
        active = {d.file for d in disks}
        with self._tx() as db:
            vm_id = db.execute(
                "INSERT INTO vms (name, created, uid) VALUES (?, ?, ?)",
                (name, utc_now(), secrets.token_hex(8)),
            ).lastrowid
            assert vm_id is not None
            self._write_disks(db, vm_id, disks)
            for path in base_files:
                db.execute(
                    "INSERT OR IGNORE INTO files (vm_id, path, owned, role) VALUES (?,?,0,?)",
                    (vm_id, path, "base" if path in active else "backing"),
                )
        return self.vm(vm_id)

    def set_uid(self, vm_id: int, uid: str) -> None:
        """Take over the identity a rebuilt VM had (its sidecars name it)."""
        with self._tx() as db:
            db.execute("UPDATE vms SET uid=? WHERE id=?", (uid, vm_id))
            self._all_changed(vm_id)  # the uid names every sidecar file

    def _write_disks(self, db: sqlite3.Connection, vm_id: int, disks: Iterable[DiskRecord]) -> None:
        self._vm_record_changed(vm_id)
        db.execute("DELETE FROM disks WHERE vm_id=?", (vm_id,))
        for position, disk in enumerate(disks):
            db.execute(
                "INSERT INTO disks (vm_id, position, name, file, format) VALUES (?,?,?,?,?)",
                (vm_id, position, disk.name, disk.file, disk.format),
            )

    def set_disks(self, vm_id: int, disks: Iterable[DiskRecord]) -> None:
        with self._tx() as db:
            self._write_disks(db, vm_id, disks)

    def set_vm_info(
        self,
        vm_id: int,
        *,
        qmp_socket: str | None = None,
        launch: dict[str, Any] | None = None,
    ) -> None:
        with self._tx() as db:
            if qmp_socket is not None:
                db.execute("UPDATE vms SET qmp_socket=? WHERE id=?", (qmp_socket, vm_id))
            if launch is not None:
                self._vm_record_changed(vm_id)
                db.execute("UPDATE vms SET launch=? WHERE id=?", (json.dumps(launch), vm_id))

    def set_saved(self, vm_id: int, saved: dict[str, Any] | None) -> None:
        with self._tx() as db:
            value = json.dumps(saved) if saved is not None else None
            db.execute("UPDATE vms SET saved=? WHERE id=?", (value, vm_id))

    def set_current(self, vm_id: int, name: str | None) -> None:
        with self._tx() as db:
            self._changed(vm_id, self._current(vm_id), name)
            db.execute("UPDATE vms SET current=? WHERE id=?", (name, vm_id))

    def memory_dir(self, vm_id: int) -> Path:
        path = self.directory
        for part in ("vms", str(vm_id), "memory"):  # each level 0700, not only the last
            path = path / part
            path.mkdir(mode=0o700, exist_ok=True)
        return path

    # --- snapshots ------------------------------------------------------------------------

    def snapshots(self, vm_id: int) -> list[Snapshot]:
        current = self.vm(vm_id).current
        rows = self._db.execute(
            "SELECT * FROM snapshots WHERE vm_id=? ORDER BY seq", (vm_id,)
        ).fetchall()
        return [_snapshot_from_row(row, current) for row in rows]

    def snapshot(self, vm_id: int, name: str) -> Snapshot:
        row = self._db.execute(
            "SELECT * FROM snapshots WHERE vm_id=? AND name=?", (vm_id, name)
        ).fetchone()
        if row is None:
            raise SnapshotNotFoundError(f"no snapshot named {name!r}")
        return _snapshot_from_row(row, self.vm(vm_id).current)

    def snapshot_files(self, vm_id: int) -> set[str]:
        """Every image and memory file the snapshots of a VM refer to.  Read straight from the
        rows: building every Snapshot costs 60 ms at 1,000 snapshots, once per operation."""
        files: set[str] = set()
        for row in self._db.execute(
            "SELECT disks, memory_file FROM snapshots WHERE vm_id=?", (vm_id,)
        ):
            files.update(d["file"] for d in json.loads(row["disks"]) if d.get("file"))
            if row["memory_file"]:
                files.add(row["memory_file"])
        return files

    def memory_files(self, vm_id: int) -> set[str]:
        rows = self._db.execute(
            "SELECT memory_file FROM snapshots WHERE vm_id=? AND memory_file IS NOT NULL", (vm_id,)
        )
        return {row[0] for row in rows}

    def has_snapshot(self, vm_id: int, name: str) -> bool:
        row = self._db.execute(
            "SELECT 1 FROM snapshots WHERE vm_id=? AND name=?", (vm_id, name)
        ).fetchone()
        return row is not None

    def add_snapshot(self, vm_id: int, snap: Snapshot, *, make_current: bool = True) -> None:
        with self._tx() as db:
            self._changed(vm_id, snap.name, self._current(vm_id) if make_current else None)
            if db.execute(
                "SELECT 1 FROM snapshots WHERE vm_id=? AND name=?", (vm_id, snap.name)
            ).fetchone():
                raise SnapshotExistsError(f"a snapshot named {snap.name!r} exists already")
            seq = db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM snapshots WHERE vm_id=?", (vm_id,)
            ).fetchone()[0]
            db.execute(
                "INSERT INTO snapshots (vm_id, name, seq, parent, kind, memory, memory_file,"
                " consistency, vm_state, created, description, disks, adopted, partial,"
                " memory_format, machine_type) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    vm_id,
                    snap.name,
                    seq,
                    snap.parent,
                    str(snap.kind),
                    str(snap.memory),
                    snap.memory_file,
                    str(snap.consistency),
                    str(snap.vm_state),
                    snap.created,
                    snap.description,
                    json.dumps([d.to_json() for d in snap.disks]),
                    int(snap.adopted),
                    int(snap.partial),
                    str(snap.memory_format) if snap.memory_format else None,
                    snap.machine_type,
                ),
            )
            if make_current:
                db.execute("UPDATE vms SET current=? WHERE id=?", (snap.name, vm_id))

    def remove_snapshots(
        self, vm_id: int, names: Iterable[str], reparent: dict[str, str | None]
    ) -> None:
        """Drop snapshots; ``reparent`` maps surviving children to their new parent."""
        names = list(names)
        with self._tx() as db:
            self._changed(vm_id, *names, *reparent, self._current(vm_id))
            for child, parent in reparent.items():
                db.execute(
                    "UPDATE snapshots SET parent=? WHERE vm_id=? AND name=?", (parent, vm_id, child)
                )
            current = db.execute("SELECT current FROM vms WHERE id=?", (vm_id,)).fetchone()[0]
            gone = set(names)  # --children of a 10,000-deep tree: no list scan per step
            for name in names:
                row = db.execute(
                    "SELECT parent FROM snapshots WHERE vm_id=? AND name=?", (vm_id, name)
                ).fetchone()
                db.execute("DELETE FROM snapshots WHERE vm_id=? AND name=?", (vm_id, name))
                if current == name:
                    # virsh moves "current" to the deleted snapshot's parent.
                    current = row[0] if row else None
                    while current in gone:
                        up = db.execute(
                            "SELECT parent FROM snapshots WHERE vm_id=? AND name=?",
                            (vm_id, current),
                        ).fetchone()
                        current = up[0] if up else None
            self._changed(vm_id, current)
            db.execute("UPDATE vms SET current=? WHERE id=?", (current, vm_id))

    def update_snapshot_disks(self, vm_id: int, name: str, disks: Iterable[DiskSnapshot]) -> None:
        with self._tx() as db:
            self._changed(vm_id, name)
            db.execute(
                "UPDATE snapshots SET disks=? WHERE vm_id=? AND name=?",
                (json.dumps([d.to_json() for d in disks]), vm_id, name),
            )

    def rename_references(self, vm_id: int, old: str, new: str) -> None:
        """Whatever referred to image ``old`` (a snapshot's disk, an active disk) now refers to
        ``new`` (after ``old`` was committed into ``new``)."""
        with self._tx() as db:
            self._vm_record_changed(vm_id)
            db.execute("UPDATE disks SET file=? WHERE vm_id=? AND file=?", (new, vm_id, old))
            rows = db.execute(
                "SELECT name, disks FROM snapshots WHERE vm_id=?", (vm_id,)
            ).fetchall()
            for row in rows:
                disks = json.loads(row["disks"])
                if any(d.get("file") == old for d in disks):
                    for d in disks:
                        if d.get("file") == old:
                            d["file"] = new
                    self._changed(vm_id, row["name"])
                    db.execute(
                        "UPDATE snapshots SET disks=? WHERE vm_id=? AND name=?",
                        (json.dumps(disks), vm_id, row["name"]),
                    )

    # --- what qemu-img said about images (qemu_img.ImageCache) ------------------------------

    def cached_image(self, path: str) -> tuple[str, str | None, str] | None:
        """(stat key, info JSON or None, tags JSON) last recorded for ``path``."""
        row = self._db.execute(
            "SELECT stat, info, tags FROM image_cache WHERE path=?", (path,)
        ).fetchone()
        return (row["stat"], row["info"], row["tags"]) if row else None

    def cache_image(self, path: str, stat: str, info: str | None, tags: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO image_cache (path, stat, info, tags) VALUES (?,?,?,?)",
                (path, stat, info, tags),
            )

    def forget_cached_image(self, path: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM image_cache WHERE path=?", (path,))

    # --- files ----------------------------------------------------------------------------

    def add_file(self, vm_id: int, path: str, *, owned: bool, role: str) -> None:
        with self._tx() as db:
            self._vm_record_changed(vm_id)
            db.execute(
                "INSERT OR REPLACE INTO files (vm_id, path, owned, role) VALUES (?,?,?,?)",
                (vm_id, path, int(owned), role),
            )

    def files(self, vm_id: int) -> dict[str, bool]:
        """Every image/memory file the store knows for this VM -> whether qemusnap owns it."""
        rows = self._db.execute("SELECT path, owned FROM files WHERE vm_id=?", (vm_id,))
        return {row["path"]: bool(row["owned"]) for row in rows}

    def file_roles(self, vm_id: int) -> dict[str, tuple[bool, str]]:
        """Every file the store knows for this VM -> (owned, role)."""
        rows = self._db.execute("SELECT path, owned, role FROM files WHERE vm_id=?", (vm_id,))
        return {row["path"]: (bool(row["owned"]), row["role"]) for row in rows}

    def protected_files(self, vm_id: int) -> set[str]:
        """Backing files found under the VM's disks when qemusnap first saw them: someone else
        made them (a template other VMs may share), so they are never written or removed."""
        rows = self._db.execute(
            "SELECT path FROM files WHERE vm_id=? AND owned=0 AND role='backing'", (vm_id,)
        )
        return {row["path"] for row in rows}

    def owned_files(self, vm_id: int) -> dict[str, str]:
        rows = self._db.execute(
            "SELECT path, role FROM files WHERE vm_id=? AND owned=1", (vm_id,)
        ).fetchall()
        return {row["path"]: row["role"] for row in rows}

    def is_owned(self, vm_id: int, path: str) -> bool:
        row = self._db.execute(
            "SELECT owned FROM files WHERE vm_id=? AND path=?", (vm_id, path)
        ).fetchone()
        return bool(row and row[0])

    def forget_file(self, vm_id: int, path: str) -> None:
        with self._tx() as db:
            self._vm_record_changed(vm_id)
            db.execute("DELETE FROM files WHERE vm_id=? AND path=?", (vm_id, path))

    def replace_snapshots(
        self, vm_id: int, snapshots: Sequence[Snapshot], *, crash: Callable[[], None] | None = None
    ) -> None:
        """Make ``snapshots`` (in creation order; ``current`` set on at most one) the VM's whole
        tree, in one transaction: interrupted, the store keeps what it had (``rebuild``)."""
        with self._tx() as db:
            self._all_changed(vm_id)
            db.execute("DELETE FROM snapshots WHERE vm_id=?", (vm_id,))
            db.execute("UPDATE vms SET current=NULL WHERE id=?", (vm_id,))
            for number, snap in enumerate(snapshots):
                self.add_snapshot(vm_id, attrs.evolve(snap, current=False), make_current=False)
                if number == len(snapshots) // 2 and crash is not None:
                    crash()  # the reliability tests kill us half-way through, here
            current = next((s.name for s in snapshots if s.current), None)
            db.execute("UPDATE vms SET current=? WHERE id=?", (current, vm_id))

    # --- sidecars (see sidecar.py) --------------------------------------------------------

    def _current(self, vm_id: int) -> str | None:
        row = self._db.execute("SELECT current FROM vms WHERE id=?", (vm_id,)).fetchone()
        return row[0] if row else None

    def _changed(self, vm_id: int, *names: str | None) -> None:
        """Note that the sidecars of ``names`` (None among them aside) may have changed."""
        pending = self._dirty.setdefault(vm_id, set())
        if pending is not None:  # None: all of them already
            pending.update(name for name in names if name is not None)

    def _all_changed(self, vm_id: int) -> None:
        self._dirty[vm_id] = None

    def _vm_record_changed(self, vm_id: int) -> None:
        # The current snapshot's sidecar carries the VM's record (disks, files, command line).
        self._changed(vm_id, self._current(vm_id))

    def sidecar_paths(self, vm_id: int) -> dict[str, str]:
        """Snapshot name -> where its sidecar was last written."""
        rows = self._db.execute("SELECT name, path FROM sidecars WHERE vm_id=?", (vm_id,))
        return {row["name"]: row["path"] for row in rows}

    def _mirror(self) -> None:
        """After a transaction: bring the sidecars it may have changed in line."""
        if self._syncing or self._depth:
            return
        while self._dirty:
            vm_id, names = self._dirty.popitem()
            self.sync_sidecars(vm_id, names)

    def sync_sidecars(self, vm_id: int, names: Iterable[str] | None = None) -> list[str]:
        """Write the sidecar of each of ``names`` (default: every snapshot of the VM) whose
        content changed, remove those of snapshots that are gone.  A sidecar that cannot be
        written (a read-only image directory) is logged and skipped: the store still has it,
        and ``check`` reports it.  Returns the problems met.

        Only the snapshots an operation touched are looked at: building every snapshot's
        document after each transaction cost 145 ms at 1,000 snapshots."""
        problems: list[str] = []
        self._syncing = True
        try:
            vm = self.vm(vm_id)
            record = {
                "uid": vm.uid,
                "name": vm.name,
                "disks": [attrs.asdict(d) for d in vm.disks],
                "launch": vm.launch,
                "files": [
                    [path, owned, role]
                    for path, (owned, role) in sorted(self.file_roles(vm_id).items())
                ],
            }
            recorded = self.sidecar_paths(vm_id)
            if names is None:
                rows = self._db.execute(
                    "SELECT * FROM snapshots WHERE vm_id=? ORDER BY seq", (vm_id,)
                ).fetchall()
                considered = set(recorded)
            else:
                considered = set(names)
                rows = [
                    row
                    for name in sorted(considered)
                    if (
                        row := self._db.execute(
                            "SELECT * FROM snapshots WHERE vm_id=? AND name=?", (vm_id, name)
                        ).fetchone()
                    )
                ]
            wanted: dict[str, str] = {}
            for row in rows:
                snap = _snapshot_from_row(row, vm.current)
                considered.add(snap.name)
                anchor = sidecar_anchor(snap)
                if anchor is None or not os.path.exists(anchor):
                    continue  # its data is gone: nothing to describe beside it
                path = sidecar.path_for(anchor, vm.uid, snap.name)
                document = {
                    "snapshot": snap.to_json(),
                    "seq": row["seq"],
                    "vm": record,
                    "written": time.time_ns(),
                }
                try:
                    # The VM's record changes with most operations: rewriting every sidecar
                    # each time would cost two fsyncs per snapshot.  The current snapshot's
                    # sidecar always carries the latest one (and any sidecar written for its
                    # own sake a newer one than before); rebuild takes the record of the
                    # sidecar written last.
                    sidecar.write(path, document, ignore=() if snap.current else ("vm",))
                except OSError as exc:
                    problems.append(f"cannot write the sidecar of {snap.name} ({path}): {exc}")
                    log.warning("%s", problems[-1])
                    continue
                wanted[snap.name] = path
            for name in considered:
                if name in recorded and wanted.get(name) != recorded[name]:
                    sidecar.remove(recorded[name])
            with self._tx() as db:
                for name in considered:
                    db.execute("DELETE FROM sidecars WHERE vm_id=? AND name=?", (vm_id, name))
                db.executemany(
                    "INSERT INTO sidecars (vm_id, name, path) VALUES (?,?,?)",
                    [(vm_id, name, path) for name, path in wanted.items()],
                )
        finally:
            self._syncing = False
        return problems

    # --- journal --------------------------------------------------------------------------

    def journal_begin(self, vm_id: int, operation: str, data: dict[str, Any]) -> int:
        with self._tx() as db:
            entry_id = db.execute(
                "INSERT INTO journal (vm_id, operation, started, pid, data) VALUES (?,?,?,?,?)",
                (vm_id, operation, utc_now(), os.getpid(), json.dumps(data)),
            ).lastrowid
        assert entry_id is not None
        return entry_id

    def journal_update(self, entry_id: int, **data: Any) -> None:
        with self._tx() as db:
            row = db.execute("SELECT data FROM journal WHERE id=?", (entry_id,)).fetchone()
            merged = {**json.loads(row[0]), **data}
            db.execute("UPDATE journal SET data=? WHERE id=?", (json.dumps(merged), entry_id))

    def journal_end(self, entry_id: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM journal WHERE id=?", (entry_id,))

    def journal(self, vm_id: int) -> list[JournalEntry]:
        rows = self._db.execute("SELECT * FROM journal WHERE vm_id=? ORDER BY id", (vm_id,))
        return [
            JournalEntry(
                r["id"], r["vm_id"], r["operation"], r["started"], r["pid"], json.loads(r["data"])
            )
            for r in rows
        ]

    # --- the per-VM lock ------------------------------------------------------------------

    def remove_vm(self, vm_id: int) -> None:
        """Forget a VM: its disks, files, snapshots and journal rows go with it."""
        with self._tx() as db:
            db.execute("DELETE FROM vms WHERE id=?", (vm_id,))

    def lock_path(self, vm_id: int) -> Path:
        return self.directory / "locks" / f"vm-{vm_id}.lock"


class VMLock:
    """A cross-process lock on one VM (``flock``): released by the kernel if we die.

    The holder writes what it is doing into the lock file, so a second process can say who
    holds the VM in its "busy" error.
    """

    def __init__(self, path: Path, operation: str) -> None:
        self.path = path
        self.operation = operation
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.operation} (pid {os.getpid()}, since {utc_now()})".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            return self.path.read_text() or "another qemusnap operation"
        except OSError:
            return "another qemusnap operation"

    def busy_error(self) -> BusyError:
        return BusyError(f"VM is busy: {self.holder()}")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def sidecar_anchor(snap: Snapshot) -> str | None:
    """The file a snapshot's sidecar lives beside: the image holding its first disk's data,
    else its memory file."""
    for disk in snap.disks:
        if disk.file:
            return disk.file
    return snap.memory_file


def _snapshot_from_row(row: sqlite3.Row, current: str | None) -> Snapshot:
    data = dict(row)  # sqlite3.Row has keys() and [key]: a mapping for dict()
    data["disks"] = json.loads(row["disks"])
    data["current"] = row["name"] == current
    data["adopted"] = bool(row["adopted"])
    data["partial"] = bool(row["partial"])
    return Snapshot.from_json(data)
