"""How qemusnap talks QMP to a running QEMU: the only module that imports ``qemu.qmp``.

:class:`Monitor` wraps :class:`qemu.qmp.QMPClient` with per-command deadlines, translation of
``qemu.qmp`` errors into :mod:`qemusnap.errors`, scoped event listeners (registered *before* the
command whose events they wait for), serialised fd passing and job waiting.

Cancellation (``asyncio.CancelledError``) is never wrapped. A timed-out command leaves the
connection usable: QMP replies carry ids, and ``qemu.qmp`` drops a late reply to a command
nobody waits for any more.
"""

# ASYNC109: the public API takes explicit timeouts by design (every public coroutine has one).

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, Final

import attrs
from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
    QMPError,
    Runstate,
    StateError,
)
from qemu.qmp.events import ListenerError
from qemu.qmp.qmp_client import GreetingError, NegotiationError
from qemu.qmp.util import flush

from .aio import deadline, shielded
from .capabilities import Capabilities
from .errors import CommandError, JobError, MonitorConnectError, MonitorError, OperationTimeout
from .models import Disk

__all__ = [
    "CLEANUP_TIMEOUT",
    "CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "EventWaiter",
    "Monitor",
    "QMPClient",
    "RunStatus",
]

log = logging.getLogger("qemusnap.monitor")

#: Default deadline of one QMP command, in seconds.
DEFAULT_TIMEOUT: Final = 30.0
#: Default deadline for connecting and the greeting/``qmp_capabilities`` exchange.
CONNECT_TIMEOUT: Final = 10.0
#: Deadline of best-effort cleanup (``job-cancel`` + ``job-dismiss``) after a failed job.
CLEANUP_TIMEOUT: Final = 5.0
#: How often ``run_block_job`` polls ``query-block-jobs`` when a progress callback is given.
PROGRESS_INTERVAL: Final = 0.5

_BLOCK_JOB_EVENTS: Final = (
    "BLOCK_JOB_READY",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_ERROR",
    "BLOCK_JOB_CANCELLED",
    "JOB_STATUS_CHANGE",
)

Event = dict[str, Any]
EventPredicate = Callable[[Event], bool]
Progress = Callable[[int, int], None]


@attrs.frozen
class RunStatus:
    """The VM run state, as ``query-status`` reports it (``running``, ``paused``, ...)."""

    status: str
    running: bool


# --- helpers --------------------------------------------------------------------------------


async def _best_effort(coro: Coroutine[Any, Any, None], timeout: float, what: str) -> None:
    """Shielded cleanup with its own deadline; failures are logged, never raised."""

    async def guarded() -> None:
        try:
            async with asyncio.timeout(timeout):
                await coro
        except Exception as exc:
            log.warning("%s failed: %s", what, exc or type(exc).__name__)

    await shielded(guarded())


def _short(value: object, limit: int = 2000) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


def _peer_credentials(sock: socket.socket) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a UNIX socket, if the kernel says."""
    if sock.family != socket.AF_UNIX or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, uid, gid = struct.unpack("3i", raw)
    # SO_PEERCRED of a socketpair() end names the process that created the pair (us), not the
    # process that holds the other end: that tells nothing about QEMU.
    if pid <= 0 or pid == os.getpid():
        return None
    return pid, uid, gid


def _connect_error_text(label: str, exc: ConnectError) -> str:
    cause = exc.exc
    if isinstance(cause, GreetingError):
        return f"{label} is not a QMP server (its greeting was not understood)"
    if isinstance(cause, NegotiationError):
        return f"{label}: QMP capabilities negotiation failed ({cause.exc})"
    if isinstance(cause, EOFError):
        return f"{label} closed the connection before the QMP greeting"
    if isinstance(cause, OSError):
        return f"cannot connect to QMP socket {label}: {cause.strerror or cause}"
    return f"cannot connect to QMP socket {label}: {cause}"


def _image_filename(inserted: Mapping[str, Any]) -> str:
    """The active image's file name; ``json:{...}`` pseudo-names are resolved to the file."""
    image = inserted.get("image") or {}
    name = str(image.get("filename") or inserted.get("file") or "")
    for candidate in (name, str(inserted.get("file") or "")):
        if not candidate.startswith("json:"):
            return candidate
        # QEMU names an image it cannot describe by a plain path (options on the protocol
        # node, a filter on top) json:{"driver": "qcow2", "file": {"filename": ...}}.
        with contextlib.suppress(ValueError):
            spec: Any = json.loads(candidate[len("json:") :])
            while isinstance(spec, dict):
                if isinstance(spec.get("filename"), str):
                    return str(spec["filename"])
                spec = spec.get("file")
    return name


def _disk_name(info: Mapping[str, Any], inserted: Mapping[str, Any]) -> str:
    qdev = str(info.get("qdev") or "")
    prefix = "/machine/peripheral/"
    if qdev.startswith(prefix):
        return qdev[len(prefix) :].split("/", 1)[0]
    if qdev and "/" not in qdev:
        return qdev
    if not info.get("device") and qdev.startswith("/machine/system.flash"):
        # A pflash attached with -machine pflashN=NODE has no drive name, and its node name
        # is the active image's (an external snapshot changes it): call it what
        # -drive if=pflash,unit=N calls it.
        return "pflash" + qdev.removeprefix("/machine/system.flash")
    return str(info.get("device") or inserted["node-name"])


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


# --- events -----------------------------------------------------------------------------------


class EventWaiter:
    """Events received by one :meth:`Monitor.listen` scope, in arrival order.

    Events that a :meth:`wait` call does not match stay queued for later calls.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = frozenset(names)
        self._events: collections.deque[Event] = collections.deque()
        self._changed = asyncio.Event()
        self._closed: str | None = None

    def _push(self, event: Event) -> None:
        self._events.append(event)
        self._changed.set()

    def _close(self, reason: str) -> None:
        if self._closed is None:
            self._closed = reason
        self._changed.set()

    async def wait(
        self,
        name: str | None = None,
        predicate: EventPredicate | None = None,
        *,
        timeout: float | None,
    ) -> Event:
        """Return (and consume) the next event named ``name`` for which ``predicate`` is true.

        :raise OperationTimeout: none came within ``timeout`` seconds.
        :raise MonitorError: the QMP connection closed first.
        """
        what = name or "/".join(sorted(self.names)) or "QMP"
        async with deadline(timeout, f"waiting for a {what} event"):
            while True:
                for index, event in enumerate(self._events):
                    if (name is None or event["event"] == name) and (
                        predicate is None or predicate(event)
                    ):
                        del self._events[index]
                        return event
                if self._closed is not None:
                    raise MonitorError(f"{self._closed} while waiting for a {what} event")
                self._changed.clear()
                await self._changed.wait()

    def drain(self) -> list[Event]:
        """Return and forget every event received and not yet consumed."""
        events = list(self._events)
        self._events.clear()
        return events


class _Forwarder(EventListener):
    """Feeds one EventWaiter; unlike EventListener it keeps no unbounded history."""

    def __init__(self, names: tuple[str, ...], waiter: EventWaiter) -> None:
        super().__init__(names or None)
        self._waiter = waiter

    async def put(self, event: Message) -> None:
        if self.accept(event):
            data = dict(event)
            data.setdefault("data", {})  # STOP, RESUME ... carry no data member
            self._waiter._push(data)


class _Client(QMPClient):
    def __init__(self, name: str | None) -> None:
        super().__init__(name)
        # QMPClient.events, the default all-events listener, queues and records every event
        # forever; nobody reads it here, so a long-lived monitor would grow without bound.
        self._listeners.remove(self.events)


async def _send_fd_in_order(client: QMPClient, fd: int) -> None:
    """send_fd_scm, made safe against the StreamWriter's own buffered output."""
    # send_fd_scm writes its one carrier byte straight to the socket, bypassing the
    # transport: were part of an earlier message still buffered there, the byte would land
    # inside that message's JSON. Flush first; nothing can be written between the flush
    # and the send, there is no await in between.
    while True:
        if client._writer is not None:
            await flush(client._writer)
        try:
            client.send_fd_scm(fd)
            return
        except BlockingIOError:
            # The socket is non-blocking and QEMU has not drained it yet.
            await asyncio.sleep(0.01)


# --- the monitor ------------------------------------------------------------------------------


class Monitor:
    """A QMP connection to one QEMU process. Use :meth:`connect`; ``async with`` closes it."""

    def __init__(
        self,
        client: QMPClient,
        *,
        label: str,
        peer: tuple[int, int, int] | None,
        borrowed: bool = False,
    ) -> None:
        self._client = client
        self.label = label
        self._peer = peer
        self._borrowed = borrowed  # the caller's client: close() leaves it connected
        self._fd_lock = asyncio.Lock()
        self._waiters: set[EventWaiter] = set()
        self._closed = False
        self._capabilities: Capabilities | None = None
        self._watcher = asyncio.create_task(self._watch_runstate())

    @classmethod
    async def connect(
        cls,
        address: str | socket.socket,
        *,
        timeout: float = CONNECT_TIMEOUT,
        name: str | None = None,
    ) -> Monitor:
        """Connect to a QMP server and negotiate capabilities.

        ``address`` is a UNIX socket path, or an already connected socket (e.g. our end of a
        socketpair whose other end QEMU got with ``-chardev socket,fd=N``); the Monitor owns
        that socket from now on, also when connecting fails.

        :raise MonitorConnectError: nothing listens, the peer is not a QMP server, or no
            greeting arrived within ``timeout`` seconds.
        """
        if isinstance(address, str):
            label = name or address
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
        else:
            label = name or f"QMP socket fd {address.fileno()}"
            sock = address
        client = _Client(name)
        try:
            async with asyncio.timeout(timeout) as scope:
                if isinstance(address, str):
                    await asyncio.get_running_loop().sock_connect(sock, address)
                peer = _peer_credentials(sock)
                await client.connect(sock)
        except BaseException as exc:
            sock.close()  # closing twice is harmless if the transport already did
            if isinstance(exc, TimeoutError) and scope.expired():
                raise MonitorConnectError(
                    f"no QMP greeting from {label} within {timeout:g} s "
                    "(not a QMP server, or another client holds this monitor?)"
                ) from None
            if isinstance(exc, ConnectError):
                raise MonitorConnectError(_connect_error_text(label, exc)) from exc
            if isinstance(exc, OSError):
                raise MonitorConnectError(
                    f"cannot connect to QMP socket {label}: {exc.strerror or exc}"
                ) from exc
            raise
        log.debug("%s: connected, greeting %s", label, client.greeting)
        return cls(client, label=label, peer=peer)

    @classmethod
    def from_client(cls, client: QMPClient) -> Monitor:
        """A Monitor over a connected ``qemu.qmp.QMPClient`` the caller already has (and
        keeps: closing the Monitor does not disconnect it)."""
        if client.runstate is not Runstate.RUNNING:
            raise MonitorConnectError("the QMPClient given is not connected")
        sock = client._writer.get_extra_info("socket") if client._writer else None
        peer = _peer_credentials(sock) if sock is not None else None
        return cls(client, label=client.name or "QMP client", peer=peer, borrowed=True)

    async def __aenter__(self) -> Monitor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect (idempotent). Errors of a connection that QEMU already closed are
        swallowed."""
        if self._closed:
            return
        self._closed = True
        self._watcher.cancel()
        for waiter in self._waiters:
            waiter._close("the QMP connection was closed")

        async def disconnect() -> None:
            await asyncio.wait({self._watcher})
            if self._borrowed:
                return
            try:
                await self._client.disconnect()
            except Exception as exc:
                # disconnect() re-raises what ended the reader (EOFError when QEMU hung up).
                log.debug("%s: disconnect: %r", self.label, exc)

        await shielded(disconnect())

    @property
    def connected(self) -> bool:
        return not self._closed and self._client.runstate is Runstate.RUNNING

    @property
    def qemu_version(self) -> tuple[int, int, int] | None:
        """QEMU's (major, minor, micro) from the QMP greeting."""
        greeting = self._client.greeting
        if greeting is None:
            return None
        qemu = greeting.QMP.version.get("qemu")
        if not isinstance(qemu, Mapping):
            return None
        return (_int(qemu.get("major")), _int(qemu.get("minor")), _int(qemu.get("micro")))

    def peer_pid(self) -> int | None:
        """PID of the process behind the QMP socket (SO_PEERCRED), None if unknown.

        A socketpair end gives None: the kernel reports the pair's creator, not QEMU.
        """
        return self._peer[0] if self._peer else None

    def peer_uid(self) -> int | None:
        """UID of the process behind the QMP socket (SO_PEERCRED), None if unknown."""
        return self._peer[1] if self._peer else None

    async def _watch_runstate(self) -> None:
        # Wake event waiters when QEMU hangs up, instead of letting them run into their deadline.
        while self._client.runstate is Runstate.RUNNING:
            await self._client.runstate_changed()
        for waiter in self._waiters:
            waiter._close("QEMU closed the QMP connection")

    # --- commands -----------------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run one QMP command and return its ``return`` value.

        :raise CommandError: QEMU answered with an error.
        :raise OperationTimeout: no answer within ``timeout`` seconds (None: wait forever).
        :raise MonitorError: the connection is closed or broke.
        """
        log.debug("%s: -> %s %s", self.label, command, _short(arguments) if arguments else "")
        try:
            async with deadline(timeout, f"QMP {command}"):
                reply = await self._client.execute(command, arguments)
        except ExecuteError as exc:
            log.debug("%s: <- %s error: %s", self.label, command, exc)
            raise CommandError(command, exc.error_class, exc.error.error.desc) from exc
        except ExecInterruptedError as exc:
            who = (
                "the QMP connection was closed"
                if self._closed
                else "QEMU closed the QMP connection"
            )
            raise MonitorError(f"{who} during {command}") from exc
        except StateError as exc:
            if exc.state is Runstate.DISCONNECTING:
                raise MonitorError(f"QEMU closed the QMP connection before {command}") from exc
            raise MonitorError(f"the QMP connection is closed ({command} not sent)") from exc
        except QMPError as exc:
            raise MonitorError(f"QMP protocol error during {command}: {exc}") from exc
        log.debug("%s: <- %s %s", self.label, command, _short(reply))
        return reply

    @contextlib.asynccontextmanager
    async def listen(self, *names: str) -> AsyncIterator[EventWaiter]:
        """Collect the events ``names`` (all events if none) for the duration of the block.

        Enter it *before* sending the command whose events you want: QEMU may emit them
        before its reply to that command.
        """
        waiter = EventWaiter(names)
        forwarder = _Forwarder(names, waiter)
        self._client.register_listener(forwarder)
        self._waiters.add(waiter)
        if not self.connected:
            waiter._close("the QMP connection is closed")
        try:
            yield waiter
        finally:
            self._waiters.discard(waiter)
            with contextlib.suppress(ListenerError):
                self._client.remove_listener(forwarder)
            waiter._close("the event listener was closed")

    async def send_fd(
        self, fd: int, fdname: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """Pass ``fd`` to QEMU (SCM_RIGHTS) and name it ``fdname`` with ``getfd``.

        The caller keeps (and must close) its own ``fd``.
        """
        async with deadline(timeout, f"passing fd {fdname!r}"), self._fd_lock:
            # QEMU keeps the last fd that arrived with any byte on the monitor socket and gives
            # it to the next getfd; the lock keeps each send/getfd pair together.
            try:
                await _send_fd_in_order(self._client, fd)
            except StateError as exc:
                raise MonitorError(
                    f"the QMP connection is closed (fd {fdname!r} not sent)"
                ) from exc
            except (QMPError, OSError) as exc:
                raise MonitorError(f"cannot pass fd {fdname!r} to QEMU: {exc}") from exc
            await self.execute("getfd", {"fdname": fdname}, timeout=None)

    async def close_fd(self, fdname: str, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Close an fd passed with :meth:`send_fd` (``closefd``)."""
        await self.execute("closefd", {"fdname": fdname}, timeout=timeout)

    async def add_fd(self, fd: int, *, opaque: str, timeout: float | None = DEFAULT_TIMEOUT) -> int:
        """Pass ``fd`` to QEMU into a new fd set (``add-fd``); return the set's id.

        QEMU opens ``/dev/fdset/ID`` by duplicating a descriptor of the set whose access mode
        matches (``file:`` migration URIs, several times with multifd).  The caller keeps
        (and must close) its own ``fd``; :meth:`remove_fd_set` releases QEMU's copies.
        """
        async with deadline(timeout, f"passing fd {opaque!r}"), self._fd_lock:
            try:
                await _send_fd_in_order(self._client, fd)
            except StateError as exc:
                raise MonitorError(
                    f"the QMP connection is closed (fd {opaque!r} not sent)"
                ) from exc
            except (QMPError, OSError) as exc:
                raise MonitorError(f"cannot pass fd {opaque!r} to QEMU: {exc}") from exc
            reply = await self.execute("add-fd", {"opaque": opaque}, timeout=None)
        return int(reply["fdset-id"])

    async def remove_fd_set(
        self, fdset_id: int, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> None:
        """``remove-fd`` a whole fd set (QEMU closes its copies once nothing uses them)."""
        await self.execute("remove-fd", {"fdset-id": fdset_id}, timeout=timeout)

    # --- what this QEMU offers ----------------------------------------------------------------

    async def capabilities(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> Capabilities:
        """Probe once per connection (``query-version``, ``query-qmp-schema``,
        ``query-migrate-capabilities``); :mod:`qemusnap.capabilities` decides from it."""
        if self._capabilities is None:
            async with deadline(timeout, "probing QEMU's capabilities"):
                version = await self.execute("query-version", timeout=None)
                schema = await self.execute("query-qmp-schema", timeout=None)
                migration = await self.execute("query-migrate-capabilities", timeout=None)
            self._capabilities = Capabilities.from_probe(version, schema, migration)
            log.debug(
                "%s: QEMU %s, migration transports %s, mapped-ram %s",
                self.label,
                self._capabilities.version_text,
                sorted(self._capabilities.migration_transports) or ["fd", "exec"],
                self._capabilities.mapped_ram,
            )
        return self._capabilities

    async def machine_type(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """The resolved QOM type of the machine (``qom-get /machine type``), e.g.
        ``pc-q35-7.2-machine`` for ``-machine q35`` on QEMU 7.2."""
        return str(
            await self.execute("qom-get", {"path": "/machine", "property": "type"}, timeout=timeout)
        )

    # --- jobs ---------------------------------------------------------------------------------

    async def run_job(
        self, command: str, arguments: Mapping[str, object], *, job_id: str, timeout: float
    ) -> None:
        """Run a generic QMP job (``snapshot-save``, ``snapshot-load``, ``snapshot-delete``).

        Waits for ``concluded``, reads the job's ``error`` from ``query-jobs`` (a concluded job
        may have failed) and dismisses it. On timeout, cancellation or any other failure the
        job is cancelled and dismissed, best effort, before the error propagates.

        :raise JobError: the job concluded with an error.
        :raise CommandError: QEMU refused to start the job.
        :raise OperationTimeout: the job did not conclude within ``timeout`` seconds.
        """
        args = {**arguments, "job-id": job_id}

        def concluded(event: Event) -> bool:
            data = event["data"]
            return bool(data.get("id") == job_id and data.get("status") in ("concluded", "null"))

        error: str | None = None
        async with self.listen("JOB_STATUS_CHANGE") as waiter:
            started = True  # until QEMU refuses it, a job of that id may exist
            finished = False
            try:
                async with deadline(timeout, f"{command} job {job_id!r}"):
                    try:
                        await self.execute(command, args, timeout=None)
                    except CommandError:
                        started = False  # never cancel a job we did not start (id in use)
                        raise
                    await waiter.wait(predicate=concluded, timeout=None)
                    info = await self._job_info(job_id)
                    if info is not None:
                        error = info.get("error")
                        await self.execute("job-dismiss", {"id": job_id}, timeout=None)
                    finished = True
            except BaseException:
                if started and not finished:
                    await _best_effort(
                        self._abort_job(job_id, waiter, "job-cancel", {"id": job_id}, True),
                        CLEANUP_TIMEOUT,
                        f"cancelling job {job_id!r}",
                    )
                raise
        if error:
            raise JobError(f"{command} job {job_id!r} failed: {error}")

    async def run_block_job(
        self,
        command: str,
        arguments: Mapping[str, object],
        *,
        job_id: str,
        timeout: float,
        complete_on_ready: bool = True,
        progress: Progress | None = None,
    ) -> None:
        """Run a block job (``block-commit``, ``block-stream``, ``drive-mirror`` ...) to its end.

        On ``BLOCK_JOB_READY`` it sends ``job-complete`` (the pivot of an active commit)
        unless ``complete_on_ready`` is false. Honours ``auto-finalize``/``auto-dismiss`` in
        ``arguments``. ``progress(offset, length)`` is called as the job advances.

        :raise JobError: the job completed with an error, or was cancelled.
        :raise OperationTimeout: the job did not end within ``timeout`` seconds.
        """
        args = {**arguments, "job-id": job_id}
        auto_finalize = bool(args.get("auto-finalize", True))
        auto_dismiss = bool(args.get("auto-dismiss", True))

        def ours(event: Event) -> bool:
            data = event["data"]
            # Block job events name the job "device" (it is the job id since QEMU 2.7).
            return bool(data.get("device") == job_id or data.get("id") == job_id)

        def report(data: Mapping[str, Any]) -> None:
            if progress is not None:
                progress(_int(data.get("offset")), _int(data.get("len")))

        error: str | None = None
        async with self.listen(*_BLOCK_JOB_EVENTS) as waiter:
            started = True
            finished = False
            try:
                async with deadline(timeout, f"{command} job {job_id!r}"):
                    try:
                        await self.execute(command, args, timeout=None)
                    except CommandError:
                        started = False
                        raise
                    completing = False
                    ended = False  # BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED seen
                    while True:
                        try:
                            event = await waiter.wait(
                                predicate=ours, timeout=PROGRESS_INTERVAL if progress else None
                            )
                        except OperationTimeout:
                            await self._poll_block_job(job_id, report)
                            continue
                        kind, data = event["event"], event["data"]
                        if kind == "BLOCK_JOB_READY":
                            report(data)
                            if complete_on_ready and not completing:
                                completing = True
                                await self.execute("job-complete", {"id": job_id}, timeout=None)
                        elif kind == "BLOCK_JOB_ERROR":
                            # With on-error=report the job ends with BLOCK_JOB_COMPLETED carrying
                            # the error; with stop/enospc it pauses and would wait forever.
                            if data.get("action") == "stop":
                                raise JobError(
                                    f"{command} job {job_id!r} stopped on an I/O error "
                                    f"during {data.get('operation', 'I/O')}"
                                )
                        elif kind in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                            report(data)
                            ended = True
                            if kind == "BLOCK_JOB_CANCELLED":
                                error = "the job was cancelled"
                            else:
                                error = data.get("error")
                            if auto_dismiss:
                                # QEMU concludes and dismisses it in the same main-loop turn.
                                break
                        else:  # JOB_STATUS_CHANGE
                            status = data.get("status")
                            if status == "pending" and not auto_finalize:
                                await self.execute("job-finalize", {"id": job_id}, timeout=None)
                            elif status == "concluded" and not auto_dismiss:
                                info = await self._job_info(job_id)
                                if not ended and info is not None:
                                    error = info.get("error")
                                await self.execute("job-dismiss", {"id": job_id}, timeout=None)
                                break
                            elif status == "null":
                                break  # gone: dismissed by someone
                    finished = True
            except BaseException:
                if started and not finished:
                    await _best_effort(
                        self._abort_job(
                            job_id,
                            waiter,
                            "block-job-cancel",
                            {"device": job_id, "force": True},
                            not auto_dismiss,
                        ),
                        CLEANUP_TIMEOUT,
                        f"cancelling block job {job_id!r}",
                    )
                raise
        if error:
            raise JobError(f"{command} job {job_id!r} failed: {error}")

    async def _job_info(self, job_id: str) -> dict[str, Any] | None:
        for job in await self.execute("query-jobs", timeout=None):
            if job.get("id") == job_id:
                return dict(job)
        return None

    async def _poll_block_job(
        self, job_id: str, report: Callable[[Mapping[str, Any]], None]
    ) -> None:
        for job in await self.execute("query-block-jobs", timeout=None):
            if job.get("device") == job_id:
                report(job)

    async def _abort_job(
        self,
        job_id: str,
        waiter: EventWaiter,
        cancel: str,
        cancel_args: Mapping[str, object],
        dismiss: bool,
    ) -> None:
        log.debug("%s: aborting job %s", self.label, job_id)
        with contextlib.suppress(CommandError):  # it may have ended meanwhile
            await self.execute(cancel, cancel_args, timeout=None)
        # job-cancel only asks: the job goes aborting -> concluded later, and job-dismiss is
        # refused before concluded. Wait for it, so the caller's own cleanup does not race it.
        info = await self._job_info(job_id)
        if info is not None and info.get("status") != "concluded":
            event = await waiter.wait(
                "JOB_STATUS_CHANGE",
                lambda e: (
                    e["data"].get("id") == job_id
                    and e["data"].get("status") in ("concluded", "null")
                ),
                timeout=None,
            )
            if event["data"]["status"] == "null":
                return
        if info is not None and dismiss:
            await self.execute("job-dismiss", {"id": job_id}, timeout=None)

    # --- typed helpers --------------------------------------------------------------------------

    async def query_status(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> RunStatus:
        reply = await self.execute("query-status", timeout=timeout)
        return RunStatus(status=str(reply["status"]), running=bool(reply["running"]))

    async def wait_status_not(
        self, status: str, timeout: float, *, interval: float = 0.01
    ) -> RunStatus:
        """Poll ``query-status`` until the VM has left ``status``; return the new state.

        E.g. after a migration to a file completes, ``cont`` fails with "Migration is not
        finalized yet" while the VM is still in ``finish-migrate``.
        """
        async with deadline(timeout, f"leaving run state {status!r}"):
            while True:
                current = await self.query_status(timeout=None)
                if current.status != status:
                    return current
                await asyncio.sleep(interval)

    async def stop(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await self.execute("stop", timeout=timeout)

    async def cont(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await self.execute("cont", timeout=timeout)

    async def quit(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        """Ask QEMU to exit (``quit``) and close the connection."""
        try:
            await self.execute("quit", timeout=timeout)
        except CommandError:
            raise
        except MonitorError as exc:
            # QEMU may close the socket before its reply to quit reaches us.
            log.debug("%s: quit: %s", self.label, exc)
        await self.close()

    async def human_monitor_command(
        self, command_line: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> str:
        """Run an HMP command through QMP; return its text output."""
        reply = await self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout=timeout
        )
        return str(reply)

    async def qemu_io(
        self, device: str, command: str, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> str:
        """Run a ``qemu-io`` command through a guest device's own block backend (HMP).

        ``device`` is a qdev path or a device id: an id is resolved with ``query-block`` to the
        device's qdev path (HMP ``qemu-io -d vda`` finds the virtio-blk-pci proxy, which has no
        block backend; ``/machine/peripheral/vda/virtio-backend`` has).

        Beware: qemu-io prints its results (``wrote ...``, pattern mismatches) on QEMU's own
        stdout, so the reply is empty even when the I/O failed. Only "Error: ..." texts
        (unknown device) come back; they raise CommandError.
        """
        target = device if "/" in device else await self._qdev_path(device)
        quoted = command.replace("\\", "\\\\").replace('"', '\\"')
        reply = await self.human_monitor_command(f'qemu-io -d {target} "{quoted}"', timeout=timeout)
        if reply.startswith("Error"):
            raise CommandError(
                "human-monitor-command", "GenericError", f"qemu-io -d {target}: {reply.strip()}"
            )
        return reply

    async def _qdev_path(self, device_id: str) -> str:
        prefix = f"/machine/peripheral/{device_id}"
        for info in await self.query_block():
            qdev = str(info.get("qdev") or "")
            if qdev == prefix or qdev.startswith(prefix + "/"):
                return qdev
        return device_id

    async def query_block(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> list[dict[str, Any]]:
        return list(await self.execute("query-block", timeout=timeout))

    async def query_named_block_nodes(
        self, flat: bool = True, *, timeout: float | None = DEFAULT_TIMEOUT
    ) -> list[dict[str, Any]]:
        return list(await self.execute("query-named-block-nodes", {"flat": flat}, timeout=timeout))

    async def query_migrate(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> dict[str, Any]:
        return dict(await self.execute("query-migrate", timeout=timeout))

    async def disks(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> list[Disk]:
        """The VM's disks with a medium, named as the CLI shows them (device id, else node)."""
        disks = []
        for info in await self.query_block(timeout=timeout):
            inserted = info.get("inserted")
            if not inserted:
                continue  # empty CD-ROM / floppy drive
            disks.append(
                Disk(
                    name=_disk_name(info, inserted),
                    file=_image_filename(inserted),
                    format=str(inserted["drv"]),
                    node_name=inserted.get("node-name"),
                    device=info.get("qdev") or None,
                    read_only=bool(inserted.get("ro", False)),
                )
            )
        return disks
