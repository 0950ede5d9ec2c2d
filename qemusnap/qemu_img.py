"""``qemu-img`` and ``qemu-io``: one coroutine per subcommand, argv lists, ``--output=json``.

Facts about qemu-img 7.2 this module relies on (see tests/integration/test_qemu_img.py):

- Image locking: a command that cannot take its lock fails with ``Failed to get "write" lock``
  (it wants to write) or ``Failed to get shared "write" lock`` (it reads and needs nobody to
  write), followed by ``Is another process using the image [NAME]?``. Both become
  :class:`ImageInUseError`. ``-U`` (force share) lifts that for readers only; qemu-img itself
  refuses ``-U`` with a writing command, and so do we, before running anything.
- A backing file that a running QEMU reads can be read without ``-U`` (QEMU shares reading), but
  every writing command on it is refused by its lock.
- ``check`` exits 0 clean, 2 corruptions, 3 leaks only, 1 when the check itself failed (no JSON
  then), 63 when the format has no checks (raw). With ``-r`` the JSON describes the image after
  the repair: ``leaks-fixed``/``corruptions-fixed`` and what remains.
- ``snapshot -c`` accepts a name that exists already (duplicate tags), ``snapshot -a`` looks a
  snapshot up by ID before name, ``snapshot -d`` by name only. So names are checked here and
  ``-a`` is given the ID.
- ``snapshot -l`` has no JSON output; ``info --output=json`` lists the snapshots instead.
- ``create`` on an existing file truncates it without a word; we create the file ourselves with
  ``O_EXCL`` and mode 0600 and let qemu-img format it in place (it keeps inode and mode).
- Relative file names are resolved by QEMU against the current directory for the image named on
  the command line, but against the overlay's directory for backing file names. Images are
  therefore always passed as absolute paths (which also keeps a ``-`` or ``proto:`` prefix from
  being read as an option or protocol); backing names are passed as given.
"""

# Every public coroutine takes a timeout (DESIGN.md), which ASYNC109 would forbid.

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import attrs

from . import process
from .errors import (
    DiskNotFoundError,
    ImageInUseError,
    QemuImgError,
    QemuSnapError,
    SnapshotExistsError,
    SnapshotNotFoundError,
    TargetExistsError,
    UnsupportedError,
    UsageError,
)
from .models import (
    Chain,
    CheckOutcome,
    CheckResult,
    ImageInfo,
    ImageMeasure,
    InternalSnapshotInfo,
    SnapshotTag,
)
from .process import Completed

__all__ = [
    "ENV_QEMU_IMG",
    "ENV_QEMU_IO",
    "ImageCache",
    "QemuImg",
    "QemuIo",
    "parse_check",
    "parse_info",
]

log = logging.getLogger(__name__)

ENV_QEMU_IMG = "QEMUSNAP_QEMU_IMG"
ENV_QEMU_IO = "QEMUSNAP_QEMU_IO"

#: Default deadline of one qemu-img run; pass ``timeout=`` for long commits and conversions.
DEFAULT_TIMEOUT = 300.0

# qemu-img check exit status.
_CHECK_CLEAN, _CHECK_FAILED, _CHECK_CORRUPT, _CHECK_LEAKS, _CHECK_UNSUPPORTED = 0, 1, 2, 3, 63

# What a run of qemu-img costs grows with the image: ``qemu-img info`` of a qcow2 with 1,000
# internal snapshots took 0.20 s here, and an internal create used to run it three times.
# QemuImg therefore keeps what qemu-img said in an ImageCache (the state directory's), keyed on
# the image's stat: an image whose (dev, inode, size, mtime, ctime) have not changed is the
# same image, and is not asked again.  After its own writes (snapshot -c/-a/-d) QemuImg knows
# the new table of names and records that; everything else qemu-img reports (sizes, dates,
# IDs QEMU picked) is read again when a caller needs it.


class ImageCache(Protocol):
    """Where QemuImg keeps what qemu-img said (``Store`` implements it)."""

    def cached_image(self, path: str) -> tuple[str, str | None, str] | None:
        """(stat key, info JSON or None, tags JSON) recorded for *path*."""

    def cache_image(self, path: str, stat: str, info: str | None, tags: str) -> None: ...

    def forget_cached_image(self, path: str) -> None: ...


def stat_key(path: str) -> str | None:
    """What says "this file has not changed": None when nothing can say it (no such file, or
    not a regular file: a block device's node keeps its mtime and size while its content
    changes, so an image on one is asked every time)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _tags_json(tags: Iterable[SnapshotTag]) -> str:
    return json.dumps([[t.id, t.name] for t in tags])


def _tags_from_json(text: str) -> list[SnapshotTag]:
    return [SnapshotTag(None if i is None else str(i), str(n)) for i, n in json.loads(text)]


_LOCK_RE = re.compile(r'Failed to get (?:shared )?"\w+" lock')
_LOCKED_IMAGE_RE = re.compile(r"Is another process using the image \[(.*)\]\?")
_NO_FILE_RE = re.compile(r"Could not open '([^']*)': No such file or directory")
_PATTERN_FAILED = "Pattern verification failed"


# --- parsing (pure) -------------------------------------------------------------------------


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise QemuImgError(f"{what}: qemu-img printed no valid JSON: {text[:200]!r}") from exc


def parse_info(text: str) -> list[ImageInfo]:
    """Parse ``qemu-img info --output=json [--backing-chain]``: the images, active first."""
    data = _load_json(text, "qemu-img info")
    items = data if isinstance(data, list) else [data]
    try:
        return [ImageInfo.from_json(item) for item in items]
    except (KeyError, TypeError, ValueError) as exc:
        raise QemuImgError(f"qemu-img info: unexpected JSON ({exc!r})") from exc


def parse_check(text: str, returncode: int, *, filename: str, in_use: bool = False) -> CheckResult:
    """Parse ``qemu-img check --output=json`` and its exit status (0, 2 or 3)."""
    data = _load_json(text, "qemu-img check")
    if not isinstance(data, dict):
        raise QemuImgError(f"qemu-img check: unexpected JSON: {text[:200]!r}")
    leaks = int(data.get("leaks", 0))
    corruptions = int(data.get("corruptions", 0))
    if returncode == _CHECK_CORRUPT or corruptions:
        outcome = CheckOutcome.CORRUPT
    elif returncode == _CHECK_LEAKS or leaks:
        outcome = CheckOutcome.LEAKS
    else:
        outcome = CheckOutcome.OK
    return CheckResult(
        filename=str(data.get("filename") or filename),
        result=outcome,
        leaks=leaks,
        corruptions=corruptions,
        leaks_fixed=int(data.get("leaks-fixed", 0)),
        corruptions_fixed=int(data.get("corruptions-fixed", 0)),
        in_use=in_use,
    )


# --- errors ---------------------------------------------------------------------------------


def _message(done: Completed) -> str:
    """The line of qemu-img's output that says what went wrong."""
    prog = os.path.basename(done.argv[0])
    lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
    for line in lines:
        # error_report() lines carry the program name; the rest is detail (check's ERROR ...).
        for prefix in (f"{prog}: ", "qemu-img: ", "qemu-io: "):
            if line.startswith(prefix):
                return line[len(prefix) :]
    if lines:
        return lines[0]
    # qemu-io reports failed commands ("read failed: ...") on stdout.
    failed = [line for line in done.stdout.splitlines() if "failed" in line]
    return failed[0].strip() if failed else f"exit status {done.returncode}"


def _error(done: Completed, image: str) -> QemuSnapError:
    """Translate a failed qemu-img/qemu-io run into the error tree."""
    prog = os.path.basename(done.argv[0])
    sub = done.argv[1] if prog.startswith("qemu-img") and len(done.argv) > 1 else ""
    what = f"{prog} {sub}".strip()
    if _LOCK_RE.search(done.stderr):
        m = _LOCKED_IMAGE_RE.search(done.stderr)
        name = m.group(1) if m else image
        return ImageInUseError(
            f"image {name} is in use by a running QEMU ({what} cannot take its lock)",
            argv=list(done.argv),
            stderr=done.stderr,
        )
    if m := _NO_FILE_RE.search(done.stderr):
        return DiskNotFoundError(f"no such image file: {m.group(1)}")
    message = _message(done).removeprefix(f"{image}: ")
    if "Operation not supported" in message:
        # e.g. an internal snapshot of a raw image: "Could not create snapshot 'x': -95 (...)"
        return UnsupportedError(f"{what} on {image}: {message}")
    return QemuImgError(
        f"{what} failed on {image}: {message}", argv=list(done.argv), stderr=done.stderr
    )


def _abspath(path: str | os.PathLike[str]) -> str:
    # No normpath: "a/../b" must mean what the kernel says when "a" is a symlink.
    path = os.fspath(path)
    return path if os.path.isabs(path) else os.path.join(os.getcwd(), path)


def _options(options: Mapping[str, str] | None) -> list[str]:
    if not options:
        return []
    # QEMU option syntax: a comma inside a value is written twice.
    return ["-o", ",".join(f"{k}={str(v).replace(',', ',,')}" for k, v in options.items())]


def _fmt(fmt: str | None) -> list[str]:
    # Naming the format avoids probing, which a guest could steer by writing a header to a raw disk.
    return ["-f", fmt] if fmt else []


class _Runner:
    _program = ""
    _env_var = ""

    def __init__(self, binary: str | None = None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._binary = binary
        self.timeout = timeout

    @property
    def binary(self) -> str:
        """The program's path: as given, else ``$QEMUSNAP_QEMU_IMG``/``_IO``, else PATH."""
        if self._binary is None:
            self._binary = process.which(self._program, self._env_var)
        return self._binary

    async def _run(
        self,
        args: Sequence[str],
        image: str,
        timeout: float | None,
        *,
        check: bool = True,
    ) -> Completed:
        return await process.run(
            [self.binary, *args],
            timeout=self.timeout if timeout is None else timeout,
            check=check,
            error=lambda done: _error(done, image),
        )


class QemuImg(_Runner):
    """Runs ``qemu-img``.

    Every coroutine takes ``timeout``: seconds for each qemu-img run it makes (default: the
    instance's). Writing commands have no ``force_share``: they never run with ``-U``.
    """

    _program = "qemu-img"
    _env_var = ENV_QEMU_IMG

    def __init__(
        self,
        binary: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cache: ImageCache | None = None,
    ) -> None:
        super().__init__(binary, timeout=timeout)
        #: Where answers are kept between runs (and processes); None: ask qemu-img every time.
        self.cache = cache
        #: path -> (stat key, info, tags): the cache's answers, parsed.
        self._parsed: dict[str, tuple[str, ImageInfo | None, tuple[SnapshotTag, ...]]] = {}

    # --- the cache ------------------------------------------------------------------------

    def _cached(
        self, path: str, *, exact: bool
    ) -> tuple[ImageInfo | None, list[SnapshotTag]] | None:
        """What the cache knows about *path* if the file is unchanged since; with *exact*,
        only a full ``qemu-img info`` answer counts."""
        if self.cache is None:
            return None
        key = stat_key(path)
        if key is None:
            return None
        # Parsed answers are kept in memory too, for the same stat: walking a chain 256
        # deep twice would otherwise parse 512 JSON documents from the store.
        known = self._parsed.get(path)
        if known is None or known[0] != key:
            entry = self.cache.cached_image(path)
            if entry is None or entry[0] != key:
                return None
            info = ImageInfo.from_json(json.loads(entry[1])) if entry[1] is not None else None
            known = self._parsed[path] = (key, info, tuple(_tags_from_json(entry[2])))
        if exact and known[1] is None:
            return None
        return known[1], list(known[2])

    def _remember(self, items: Sequence[Any], images: Sequence[ImageInfo]) -> None:
        assert self.cache is not None
        for item, image in zip(items, images, strict=True):
            self._parsed.pop(image.filename, None)
            key = stat_key(image.filename) if image.filename.startswith("/") else None
            if key is not None:
                self.cache.cache_image(
                    image.filename,
                    key,
                    json.dumps(item),
                    _tags_json(SnapshotTag(s.id, s.name) for s in image.snapshots),
                )

    def _after_write(self, path: str, tags: Sequence[SnapshotTag] | None) -> None:
        """Record *path*'s snapshot names after a write of ours (None: unknown, forget it)."""
        if self.cache is None:
            return
        self._parsed.pop(path, None)
        key = stat_key(path)
        if tags is None or key is None:
            self.cache.forget_cached_image(path)
        else:
            self.cache.cache_image(path, key, None, _tags_json(tags))

    # --- reading --------------------------------------------------------------------------

    async def info(
        self,
        path: str | os.PathLike[str],
        *,
        backing_chain: bool = True,
        force_share: bool = False,
        fmt: str | None = None,
        timeout: float | None = None,
    ) -> list[ImageInfo]:
        """The image (and with *backing_chain* its backing files), active image first.

        With a cache, images unchanged since qemu-img last described them are not asked again
        (so, unlike ``qemu-img info`` without ``-U``, a cached answer does not tell whether a
        QEMU writes the image: :meth:`image_in_use` asks).
        """
        path = _abspath(path)
        if self.cache is None:
            return await self._info_run(path, backing_chain, force_share, fmt, timeout)
        # Walk down the chain through the cache.  The first image it does not know (after a
        # snapshot: the new overlay on top) is asked alone; if the image below that is not
        # known either, the rest of the chain is asked in one run.  Each image opens once.
        images: list[ImageInfo] = []
        seen: set[str] = set()  # a loop in the chain ends the walk
        current: str | None = path
        while current is not None and current not in seen:
            hit = self._cached(current, exact=True)
            if hit is not None and hit[0] is not None:
                found = [hit[0]]
            else:
                found = await self._info_run(
                    current,
                    backing_chain and bool(images),
                    force_share,
                    images[-1].backing_format if images else fmt,
                    timeout,
                )
            images += found
            seen.update(image.filename for image in found)
            current = images[-1].backing_filename if backing_chain else None
        return images

    async def _info_run(
        self,
        path: str,
        backing_chain: bool,
        force_share: bool,
        fmt: str | None,
        timeout: float | None,
    ) -> list[ImageInfo]:
        before = stat_key(path) if self.cache is not None else None
        args = ["info", "--output=json", *_fmt(fmt)]
        if backing_chain:
            args.append("--backing-chain")
        if force_share:
            args.append("-U")
        done = await self._run([*args, path], path, timeout)
        data = _load_json(done.stdout, "qemu-img info")
        items = data if isinstance(data, list) else [data]
        images = parse_info(done.stdout)
        # Only an answer about an image that did not change while qemu-img read it is kept.
        if self.cache is not None and before is not None and stat_key(path) == before:
            self._remember(items, images)
        return images

    async def tags(
        self,
        path: str | os.PathLike[str],
        *,
        force_share: bool = False,
        fmt: str | None = None,
        timeout: float | None = None,
    ) -> list[SnapshotTag]:
        """The names (and IDs where known) of *path*'s internal snapshots, oldest first: from
        the cache while the image is unchanged, else from ``qemu-img info``."""
        path = _abspath(path)
        hit = self._cached(path, exact=False)
        if hit is not None:
            return hit[1]
        images = await self.info(
            path, backing_chain=False, force_share=force_share, fmt=fmt, timeout=timeout
        )
        return [SnapshotTag(s.id, s.name) for s in images[0].snapshots]

    async def chain(
        self,
        disk_name: str,
        path: str | os.PathLike[str],
        *,
        force_share: bool = False,
        fmt: str | None = None,
        timeout: float | None = None,
    ) -> Chain:
        """The backing chain of disk *disk_name* whose active image is *path*."""
        images = await self.info(path, force_share=force_share, fmt=fmt, timeout=timeout)
        return Chain(disk=disk_name, images=tuple(images))

    async def check(
        self,
        path: str | os.PathLike[str],
        *,
        repair: Literal["leaks", "all"] | None = None,
        force_share: bool = False,
        fmt: str | None = None,
        without_backing: bool = False,
        timeout: float | None = None,
    ) -> CheckResult:
        """``qemu-img check``; with *repair*, fix leaks (or everything) and report what remains.

        A format without checks (raw) gives ``result=ok, supported=False``. With
        *force_share* (an image a running QEMU writes) the result can show leaks or
        corruptions that are only metadata QEMU has not written yet.

        *without_backing* (needs *fmt*, for an image that has a backing file): check the image
        alone.  ``qemu-img check IMAGE`` opens the whole backing chain below IMAGE although the
        qcow2 check reads only IMAGE's own metadata, so checking every image of an n-deep chain
        that way opens n²/2 images (39.5 s for 256 on the project machine).  A ``json:`` spec
        with ``"backing": null`` opens IMAGE alone; the check itself (refcounts, L1/L2 tables,
        ``-r``) is the same.
        """
        path = _abspath(path)
        if without_backing and not fmt:
            raise UsageError("checking an image without its backing file needs its format")
        if repair is not None and force_share:
            raise UsageError(
                f"refusing to repair {path} with force-share: never write an image a running "
                "QEMU has open"
            )
        if repair not in (None, "leaks", "all"):
            raise UsageError(f"repair must be 'leaks' or 'all', not {repair!r}")
        if without_backing:
            assert fmt is not None
            args = ["check", "--output=json"]
            target = _alone_spec(path, fmt)
        else:
            args = ["check", "--output=json", *_fmt(fmt)]
            target = path
        if repair:
            args += ["-r", repair]
        if force_share:
            args.append("-U")
        done = await self._run([*args, target], path, timeout, check=False)
        if done.returncode == _CHECK_UNSUPPORTED and "does not support checks" in done.stderr:
            return CheckResult(
                filename=path, result=CheckOutcome.OK, in_use=force_share, supported=False
            )
        if done.returncode not in (_CHECK_CLEAN, _CHECK_CORRUPT, _CHECK_LEAKS):
            # 1: the check could not run to the end (I/O error, or -r leaks on an image that
            # needs its refcounts rebuilt); qemu-img prints no JSON then.
            raise _error(done, path)
        result = parse_check(done.stdout, done.returncode, filename=path, in_use=force_share)
        # With a json: spec qemu-img reports that spec as the filename: name the file instead.
        return attrs.evolve(result, filename=path) if without_backing else result

    async def measure(
        self,
        *,
        path: str | os.PathLike[str] | None = None,
        size: int | None = None,
        fmt: str | None = None,
        out_fmt: str = "qcow2",
        options: Mapping[str, str] | None = None,
        force_share: bool = False,
        timeout: float | None = None,
    ) -> ImageMeasure:
        """Space an *out_fmt* image would need: a copy of *path*, or a new one of *size*."""
        if (path is None) == (size is None):
            raise UsageError("measure needs exactly one of path and size")
        args = ["measure", "--output=json", "-O", out_fmt, *_options(options)]
        if size is not None:
            image = f"(new {out_fmt} of {size} bytes)"
            args += ["--size", str(size)]
        else:
            assert path is not None
            image = _abspath(path)
            args += [*_fmt(fmt), *(["-U"] if force_share else []), image]
        done = await self._run(args, image, timeout)
        data = _load_json(done.stdout, "qemu-img measure")
        try:
            return ImageMeasure.from_json(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise QemuImgError(f"qemu-img measure: unexpected JSON ({exc!r})") from exc

    async def image_in_use(
        self,
        path: str | os.PathLike[str],
        *,
        for_write: bool = False,
        timeout: float | None = None,
    ) -> bool:
        """Whether a running QEMU holds *path*.

        By default: whether one writes it (reading then needs ``force_share``). With
        *for_write*: whether any process has it open in a way that blocks writing (this also
        catches the backing files of a running VM). That probe opens only the file layer
        read-write, asks it for a snapshot that cannot exist, and so changes nothing.
        """
        path = _abspath(path)
        try:
            if for_write:
                spec = "driver=file,filename=" + path.replace(",", ",,")
                args = ["snapshot", "-d", "qemusnap-probe", "--image-opts", spec]
                done = await self._run(args, path, timeout, check=False)
                if done.returncode != 0 and "snapshot not found" not in done.stderr:
                    raise _error(done, path)
            else:
                await self.info(path, backing_chain=False, timeout=timeout)
        except ImageInUseError:
            return True
        return False

    # --- internal snapshots ---------------------------------------------------------------

    async def snapshot_list(
        self,
        path: str | os.PathLike[str],
        *,
        force_share: bool = False,
        fmt: str | None = None,
        timeout: float | None = None,
    ) -> list[InternalSnapshotInfo]:
        """The internal snapshots of *path*, oldest first."""
        # qemu-img 7.2 "snapshot -l" has no --output=json; info lists the same table.
        images = await self.info(
            path, backing_chain=False, force_share=force_share, fmt=fmt, timeout=timeout
        )
        return list(images[0].snapshots)

    async def _find_snapshot(
        self, path: str, name: str, fmt: str | None, timeout: float | None
    ) -> tuple[SnapshotTag, list[SnapshotTag]]:
        """Internal snapshot *name* of *path* (it must be there once), and all of them."""
        tags = await self.tags(path, fmt=fmt, timeout=timeout)
        found = [s for s in tags if s.name == name]
        if not found:
            raise SnapshotNotFoundError(f"image {path} has no internal snapshot named {name!r}")
        if len(found) > 1:
            raise UnsupportedError(
                f"image {path} has {len(found)} internal snapshots named {name!r} "
                f"(IDs {', '.join(s.id or '?' for s in found)}); refusing to guess"
            )
        return found[0], tags

    async def snapshot_create(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        fmt: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Create internal snapshot *name* (``qemu-img snapshot -c``); names must be new."""
        path = _abspath(path)
        if not name:
            raise UsageError("an internal snapshot needs a name")
        existing = await self.tags(path, fmt=fmt, timeout=timeout)
        if any(s.name == name for s in existing):
            raise SnapshotExistsError(f"image {path} already has an internal snapshot {name!r}")
        try:
            await self._run(["snapshot", *_fmt(fmt), "-c", name, path], path, timeout)
        except BaseException:
            self._after_write(path, None)
            raise
        # QEMU picks the new ID (block/qcow2-snapshot.c, find_new_snapshot_id): not guessed.
        self._after_write(path, [*existing, SnapshotTag(None, name)])

    async def snapshot_apply(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        fmt: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Revert the image to internal snapshot *name* (``qemu-img snapshot -a``)."""
        path = _abspath(path)
        snap, tags = await self._find_snapshot(path, name, fmt, timeout)
        # -a tries IDs before names: a snapshot *named* "2" would lose to the one with ID 2.
        # So -a gets the ID, or the name when no ID can equal it: every known ID differs, and
        # the IDs not read yet are QEMU's, decimal numbers (find_new_snapshot_id).
        selector = snap.id
        if selector is None:
            if re.fullmatch(r"[0-9]+", name) or any(t.id == name for t in tags):
                if self.cache is not None:
                    self.cache.forget_cached_image(path)
                snap, tags = await self._find_snapshot(path, name, fmt, timeout)
                selector = snap.id
            else:
                selector = name
        assert selector is not None
        try:
            await self._run(["snapshot", *_fmt(fmt), "-a", selector, path], path, timeout)
        finally:
            # Reverting rewrites the image's tables, never its snapshot table.
            self._after_write(path, tags)

    async def snapshot_delete(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        fmt: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Delete internal snapshot *name* (``qemu-img snapshot -d``)."""
        path = _abspath(path)
        _, tags = await self._find_snapshot(path, name, fmt, timeout)
        # -d looks up names only (unlike -a), and the name is unique here.
        try:
            await self._run(["snapshot", *_fmt(fmt), "-d", name, path], path, timeout)
        except BaseException:
            self._after_write(path, None)
            raise
        self._after_write(path, [t for t in tags if t.name != name])

    # --- images ---------------------------------------------------------------------------

    async def create(
        self,
        path: str | os.PathLike[str],
        *,
        fmt: str = "qcow2",
        size: int | None = None,
        backing: str | None = None,
        backing_fmt: str | None = None,
        mode: int = 0o600,
        owner: tuple[int, int] | None = None,
        options: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Create a new image; an existing *path* is never touched (:class:`TargetExistsError`).

        *owner* (uid, gid): the new file belongs to them (the user a QEMU runs as).

        *size* may be omitted with *backing* (the overlay takes the backing file's size). A
        relative *backing* name is relative to the new image's directory, as QEMU reads it.
        On failure or cancellation the file this call created is removed.
        """
        path = _abspath(path)
        if size is None and backing is None:
            raise UsageError(f"cannot create {path}: give a size or a backing file")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError as exc:
            raise TargetExistsError(f"{path} exists already (it is never overwritten)") from exc
        except FileNotFoundError as exc:
            raise UsageError(f"cannot create {path}: no such directory") from exc
        except OSError as exc:
            raise QemuImgError(f"cannot create {path}: {exc.strerror or exc}") from exc
        try:
            os.fchmod(fd, mode)  # exactly *mode*, whatever the umask
            if owner is not None:
                os.fchown(fd, *owner)
            made = os.fstat(fd)
        finally:
            os.close(fd)

        args = ["create", "-f", fmt]
        if backing is not None:
            args += ["-b", backing]
            if size is None:
                size, backing_fmt = await self._backing_size(path, backing, backing_fmt, timeout)
                if size is not None:
                    args.append("-u")
            if backing_fmt:
                args += ["-F", backing_fmt]
        args += [*_options(options), path]
        if size is not None:
            args.append(str(size))
        try:
            await self._run(args, path, timeout)
        except BaseException:
            _remove_if_same(path, made)
            raise

    async def _backing_size(
        self, path: str, backing: str, backing_fmt: str | None, timeout: float | None
    ) -> tuple[int | None, str | None]:
        """The virtual size (None: let qemu-img find it) and format of an overlay's backing
        file.  ``qemu-img create -b`` opens the backing file *with its whole chain* to learn
        its size: 300 ms under a chain 256 deep.  From the cache (or one ``info`` of the
        backing file alone, ``-U`` as qemu-img create opens it: a running QEMU may write it)
        the size is known, and ``-u`` makes the same overlay without opening the chain."""
        base = os.path.join(os.path.dirname(path), backing)  # relative: to the overlay's dir
        if not os.path.isfile(base):
            return None, backing_fmt  # a protocol (nbd://, json:) or a block device
        (image,) = await self.info(
            base, backing_chain=False, force_share=True, fmt=backing_fmt, timeout=timeout
        )
        return image.virtual_size, backing_fmt or image.format

    async def commit(
        self,
        path: str | os.PathLike[str],
        *,
        base: str | None = None,
        keep_top: bool = False,
        fmt: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Write *path*'s data into its backing file, or down to *base* in its chain.

        qemu-img empties *path* afterwards unless *keep_top* (``-d``); with *base* it never
        empties it (``-b`` implies ``-d``), and the images between are no longer valid.
        """
        path = _abspath(path)
        args = ["commit", *_fmt(fmt)]
        if base is not None:
            args += ["-b", base]
        if keep_top:
            args.append("-d")
        await self._run([*args, path], path, timeout)

    async def rebase(
        self,
        path: str | os.PathLike[str],
        backing: str | None,
        backing_fmt: str | None = None,
        *,
        unsafe: bool = False,
        fmt: str | None = None,
        timeout: float | None = None,
    ) -> None:
        """Make *backing* (None or ``""``: nothing) the backing file of *path*.

        Safe mode copies into *path* whatever differs between the old and the new backing
        chain, so the guest-visible content stays the same; *unsafe* (``-u``) only rewrites
        the header.
        """
        path = _abspath(path)
        args = ["rebase", *_fmt(fmt)]
        if unsafe:
            args.append("-u")
        args += ["-b", backing or ""]
        if backing and backing_fmt:
            args += ["-F", backing_fmt]
        await self._run([*args, path], path, timeout)


def _alone_spec(path: str, fmt: str) -> str:
    """A ``json:`` image spec that opens *path* (format *fmt*) without its backing chain."""
    spec = {"driver": fmt, "file": {"driver": "file", "filename": path}, "backing": None}
    return "json:" + json.dumps(spec)


def _remove_if_same(path: str, made: os.stat_result) -> None:
    """Unlink *path* only if it is still the file we created (never someone else's)."""
    try:
        now = os.lstat(path)
        if (now.st_dev, now.st_ino) == (made.st_dev, made.st_ino):
            os.unlink(path)
    except FileNotFoundError:
        pass  # qcow2 creation deletes its file itself when it fails
    except OSError as exc:
        log.warning("could not remove half-made image %s: %s", path, exc)


class QemuIo(_Runner):
    """Runs ``qemu-io``: writes and verifies byte patterns (the qemu-iotests idiom)."""

    _program = "qemu-io"
    _env_var = ENV_QEMU_IO

    async def run(
        self,
        image: str,
        commands: Iterable[str],
        *,
        fmt: str | None = None,
        read_only: bool = False,
        force_share: bool = False,
        check: bool = True,
        timeout: float | None = None,
    ) -> Completed:
        """Run qemu-io *commands* (``-c``) on *image*: an absolute path or a URI (``nbd+unix:``).

        qemu-io runs every command even after one failed and then exits 1.
        """
        if force_share and not read_only:
            raise UsageError("force-share is only for read-only access")
        args: list[str] = [*_fmt(fmt)]
        if read_only:
            args.append("-r")
        if force_share:
            args.append("-U")
        for command in commands:
            args += ["-c", command]
        return await self._run([*args, image], image, timeout, check=check)

    async def write_pattern(
        self,
        path: str | os.PathLike[str],
        pattern: int,
        offset: int,
        length: int,
        *,
        fmt: str,
        timeout: float | None = None,
    ) -> None:
        """Fill ``length`` bytes at ``offset`` with the byte *pattern*."""
        image = _abspath(path)
        done = await self.run(
            image, [f"write -P {_byte(pattern)} {offset} {length}"], fmt=fmt, timeout=timeout
        )
        if "wrote " not in done.stdout:
            raise _error(done, image)

    async def verify_pattern(
        self,
        path: str | os.PathLike[str],
        pattern: int,
        offset: int,
        length: int,
        *,
        fmt: str,
        force_share: bool = False,
        timeout: float | None = None,
    ) -> bool:
        """Whether ``length`` bytes at ``offset`` all equal *pattern* (read-only)."""
        return await self._verify(
            _abspath(path), pattern, offset, length, fmt, force_share, timeout
        )

    async def read_pattern_nbd(
        self,
        uri: str,
        pattern: int,
        offset: int,
        length: int,
        *,
        timeout: float | None = None,
    ) -> bool:
        """Like :meth:`verify_pattern` on an NBD export (``nbd+unix:///NAME?socket=PATH``)."""
        return await self._verify(uri, pattern, offset, length, "raw", False, timeout)

    async def _verify(
        self,
        image: str,
        pattern: int,
        offset: int,
        length: int,
        fmt: str,
        force_share: bool,
        timeout: float | None,
    ) -> bool:
        done = await self.run(
            image,
            [f"read -P {_byte(pattern)} {offset} {length}"],
            fmt=fmt,
            read_only=True,
            force_share=force_share,
            check=False,
            timeout=timeout,
        )
        # qemu-io 7.2 exits 1 on a mismatch, but also when it could not read at all: only
        # the message (on stdout) tells the two apart.
        if _PATTERN_FAILED in done.stdout or _PATTERN_FAILED in done.stderr:
            return False
        if done.returncode != 0 or f"read {length}/{length} bytes" not in done.stdout:
            raise _error(done, image)
        return True


def _byte(pattern: int) -> str:
    if not 0 <= pattern <= 0xFF:
        raise UsageError(f"a pattern is one byte (0..255), not {pattern}")
    return f"0x{pattern:02x}"
