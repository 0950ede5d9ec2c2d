"""A client for qemu-guest-agent (QGA) over its UNIX socket, and the ``frozen()`` quiesce scope.

The agent speaks QMP-style JSON, one object per line, with no greeting and no
``qmp_capabilities``. Its stream carries no state about clients: a reply meant for an earlier
client (one that timed out and went away) can still be waiting in it. So every connection starts
with ``guest-sync-delimited``, whose reply the agent prefixes with a 0xFF byte: everything before
that byte and any reply not carrying our random id is stale and discarded.

A command interrupted after it was sent (timeout, cancellation) leaves a reply in flight; the
connection is then dropped, and the next command reconnects and resynchronises.
"""

# ASYNC109: the public API takes explicit timeouts by design (every public coroutine has one).

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final

import attrs

from .aio import deadline, shielded
from .errors import GuestAgentError, OperationTimeout

__all__ = [
    "DEFAULT_TIMEOUT",
    "ExecResult",
    "GuestAgent",
    "frozen",
]

log = logging.getLogger("qemusnap.agent")

#: Default deadline of one agent command, in seconds.
DEFAULT_TIMEOUT: Final = 10.0
#: Default deadline of ``guest-fsfreeze-freeze``: it syncs every filesystem first.
FREEZE_TIMEOUT: Final = 30.0
#: Default deadline of ``guest-fsfreeze-thaw``.
THAW_TIMEOUT: Final = 10.0

# guest-exec-status may carry up to 16 MiB of output per stream, base64-encoded.
_READ_LIMIT: Final = 64 * 1024 * 1024
_SENTINEL: Final = b"\xff"


@attrs.frozen
class ExecResult:
    """The outcome of a ``guest-exec``.

    ``exitcode`` is negative (-signal) when the process was killed by a signal.
    """

    exitcode: int
    stdout: bytes
    stderr: bytes
    truncated: bool = False  # the agent cut the captured output (16 MiB per stream)


class GuestAgent:
    """A connection to qemu-guest-agent.

    Either ``await GuestAgent.connect(path)``, or ``async with GuestAgent(path) as agent``
    (which connects on entry); ``async with`` closes it. ``timeout`` bounds connecting.
    """

    def __init__(self, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._dropped: list[asyncio.StreamWriter] = []
        self._lock = asyncio.Lock()
        self._closed = False

    @classmethod
    async def connect(cls, path: str, *, timeout: float = DEFAULT_TIMEOUT) -> GuestAgent:
        """Connect to the agent's socket and resynchronise the stream.

        :raise GuestAgentError: the socket cannot be opened, or the agent hung up.
        :raise OperationTimeout: the agent did not answer ``guest-sync-delimited`` in time
            (typically: qemu-ga is not running in the guest).
        """
        agent = cls(path, timeout=timeout)
        await agent._connect()
        return agent

    async def _connect(self) -> None:
        try:
            async with deadline(self.timeout, f"connecting to the guest agent at {self.path}"):
                await self._open()
        except BaseException:
            await self.close()
            raise

    async def __aenter__(self) -> GuestAgent:
        if self._writer is None and not self._closed:
            await self._connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def close(self) -> None:
        """Close the connection (idempotent); commands after this raise GuestAgentError."""
        self._closed = True
        self._drop()
        dropped, self._dropped = self._dropped, []
        for writer in dropped:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _drop(self) -> None:
        """Forget the connection (its stream may hold a reply we will never read)."""
        if self._writer is not None:
            self._writer.close()
            self._dropped.append(self._writer)
        self._reader = self._writer = None

    async def _open(self) -> None:
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                self.path, limit=_READ_LIMIT
            )
        except OSError as exc:
            raise GuestAgentError(
                f"cannot connect to the guest agent socket {self.path}: {exc.strerror or exc}"
            ) from exc
        try:
            await self._sync()
        except BaseException:
            self._drop()
            raise

    async def _sync(self) -> None:
        assert self._reader is not None and self._writer is not None
        sync_id = random.randrange(1, 2**31)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        # A leading 0xFF makes the agent discard whatever partial request an earlier client left.
        self._writer.write(_SENTINEL + json.dumps(request).encode() + b"\n")
        log.debug("%s: -> guest-sync-delimited %d", self.path, sync_id)
        await self._writer.drain()
        while True:
            try:
                await self._reader.readuntil(_SENTINEL)
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)  # stale data: skip
                continue
            except asyncio.IncompleteReadError as exc:
                raise GuestAgentError(
                    "the guest agent closed the connection during guest-sync-delimited"
                ) from exc
            line = (await self._reader.readline()).rsplit(_SENTINEL, 1)[-1]
            with contextlib.suppress(ValueError):
                reply = json.loads(line)
                if isinstance(reply, dict) and reply.get("return") == sync_id:
                    log.debug("%s: <- in sync", self.path)
                    return
            if not line.endswith(b"\n"):  # at EOF
                raise GuestAgentError(
                    "the guest agent closed the connection during guest-sync-delimited"
                )
            # a stale reply, or the parse error our 0xFF may provoke: keep looking

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> Any:
        """Run one agent command and return its ``return`` value.

        Reconnects first if an earlier command was interrupted.

        :raise GuestAgentError: the agent answered with an error, or the connection failed.
        :raise OperationTimeout: no answer within ``timeout`` seconds (None: wait forever).
        """
        request: dict[str, object] = {"execute": command}
        if arguments is not None:
            request["arguments"] = dict(arguments)
        async with deadline(timeout, f"guest agent command {command}"), self._lock:
            if self._closed:
                raise GuestAgentError(f"the guest agent connection is closed ({command} not sent)")
            if self._reader is None:
                await self._open()
            assert self._reader is not None and self._writer is not None
            log.debug("%s: -> %s %s", self.path, command, arguments or "")
            try:
                self._writer.write(json.dumps(request).encode() + b"\n")
                await self._writer.drain()
                reply = await self._read_reply(command)
            except BaseException:
                self._drop()
                raise
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            cls = error.get("class", "?") if isinstance(error, dict) else "?"
            log.debug("%s: <- %s error: %s", self.path, command, desc)
            raise GuestAgentError(f"guest agent {command} failed: {desc} ({cls})")
        log.debug("%s: <- %s %.2000r", self.path, command, reply.get("return"))
        return reply.get("return")

    async def _read_reply(self, command: str) -> dict[str, Any]:
        assert self._reader is not None
        while True:
            try:
                line = await self._reader.readline()
            except (OSError, ValueError) as exc:  # ValueError: a line beyond the read limit
                raise GuestAgentError(
                    f"guest agent connection failed during {command}: {exc}"
                ) from exc
            if not line:
                raise GuestAgentError(f"the guest agent closed the connection during {command}")
            line = line.strip().lstrip(_SENTINEL)
            if not line:
                continue
            try:
                reply = json.loads(line)
            except ValueError as exc:
                raise GuestAgentError(f"guest agent sent garbage in reply to {command}") from exc
            if isinstance(reply, dict) and ("return" in reply or "error" in reply):
                return reply
            raise GuestAgentError(f"guest agent sent an unexpected reply to {command}: {line!r}")

    # --- typed helpers --------------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> None:
        await self.execute("guest-ping", timeout=timeout)

    async def fsfreeze_freeze(self, *, timeout: float | None = FREEZE_TIMEOUT) -> int:
        """Freeze the guest's filesystems; return how many were frozen."""
        return int(await self.execute("guest-fsfreeze-freeze", timeout=timeout))

    async def fsfreeze_thaw(self, *, timeout: float | None = THAW_TIMEOUT) -> int:
        """Thaw the guest's filesystems; return how many were thawed."""
        return int(await self.execute("guest-fsfreeze-thaw", timeout=timeout))

    async def fsfreeze_status(self, *, timeout: float | None = DEFAULT_TIMEOUT) -> str:
        """``"thawed"`` or ``"frozen"``."""
        return str(await self.execute("guest-fsfreeze-status", timeout=timeout))

    async def exec(
        self,
        path: str,
        args: Sequence[str] = (),
        *,
        capture: bool = True,
        timeout: float = DEFAULT_TIMEOUT,
        poll_interval: float = 0.2,
    ) -> ExecResult:
        """Run a program in the guest (``guest-exec``) and wait for it to exit.

        On timeout the program keeps running in the guest (the agent cannot kill it).
        """
        arguments = {"path": path, "arg": list(args), "capture-output": capture}
        async with deadline(timeout, f"guest-exec {path}"):
            started = await self.execute("guest-exec", arguments, timeout=None)
            pid = started["pid"]
            delay = 0.005
            while True:
                status = await self.execute("guest-exec-status", {"pid": pid}, timeout=None)
                if status.get("exited"):
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, poll_interval)
        if "exitcode" in status:
            exitcode = int(status["exitcode"])
        else:
            exitcode = -int(status.get("signal", 0))
        return ExecResult(
            exitcode=exitcode,
            stdout=base64.b64decode(status.get("out-data", "")),
            stderr=base64.b64decode(status.get("err-data", "")),
            truncated=bool(status.get("out-truncated") or status.get("err-truncated")),
        )


async def _thaw(agent: GuestAgent, timeout: float) -> int:
    # guest-fsfreeze-thaw is harmless on a thawed guest (it returns 0).
    return await agent.fsfreeze_thaw(timeout=timeout)


async def _thaw_after_failure(agent: GuestAgent, timeout: float, exc: BaseException) -> None:
    try:
        await shielded(_thaw(agent, timeout))
    except Exception as thaw_exc:
        log.warning("guest filesystems may still be frozen: thaw failed: %s", thaw_exc)
        exc.add_note(f"guest filesystems may still be frozen: thaw failed: {thaw_exc}")


@contextlib.asynccontextmanager
async def frozen(
    agent: GuestAgent,
    *,
    timeout: float = FREEZE_TIMEOUT,
    thaw_timeout: float = THAW_TIMEOUT,
) -> AsyncIterator[int]:
    """Quiesce: freeze the guest's filesystems for the body, yielding how many were frozen.

    The thaw runs on every exit path (error, timeout, cancellation), shielded and with its own
    deadline. If the freeze fails or times out, a thaw is still attempted: the agent may have
    frozen some filesystems before failing, or finish freezing after we stopped waiting.

    :raise GuestAgentError: the thaw failed after a successful body.
    """
    try:
        count = await agent.fsfreeze_freeze(timeout=timeout)
    except BaseException as exc:
        await _thaw_after_failure(agent, thaw_timeout, exc)
        raise
    try:
        yield count
    except BaseException as exc:
        await _thaw_after_failure(agent, thaw_timeout, exc)
        raise
    try:
        await shielded(_thaw(agent, thaw_timeout))
    except (GuestAgentError, OperationTimeout) as exc:
        raise GuestAgentError(f"guest filesystems may still be frozen: thaw failed: {exc}") from exc
