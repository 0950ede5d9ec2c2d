"""Fake QMP and qemu-guest-agent servers for unit tests (no QEMU needed).

Both run in the test's own event loop on a UNIX socket in a short ``mkdtemp`` directory under
/tmp (pytest's ``tmp_path`` can exceed the 108-byte socket path limit).

Scripts map a command name to what the server answers:

* a plain value: ``{"return": value}``;
* :class:`Error`: an error reply;
* :class:`Reply`: a value or error plus a delay, events to emit before/after, or a hang-up;
* a callable ``(server, arguments) -> any of the above`` (may be async; it can ``await
  server.emit(...)``, and look at ``server.commands``).

Unknown commands get QEMU's ``CommandNotFound`` error.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import attrs


@attrs.frozen
class Error:
    cls: str = "GenericError"
    desc: str = "failed"


@attrs.frozen
class Reply:
    value: Any = attrs.field(factory=dict)
    error: Error | None = None
    delay: float = 0.0  # seconds before replying (the server answers in order, as QEMU does)
    before: tuple[tuple[str, dict[str, Any]], ...] = ()  # events emitted before the reply
    after: tuple[tuple[str, dict[str, Any]], ...] = ()  # events emitted after the reply
    after_delay: float = 0.0
    hang_up: bool = False  # close the connection instead of replying
    no_reply: bool = False  # never reply (the server keeps reading)


Script = Mapping[str, Any] | Callable[[str, dict[str, Any]], Any]

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"},
        "capabilities": ["oob"],
    }
}


def event_message(name: str, data: dict[str, Any] | None = None) -> dict[str, Any]:
    now = time.time()
    message: dict[str, Any] = {
        "event": name,
        "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
    }
    if data is not None:
        message["data"] = data
    return message


def short_tempdir() -> str:
    return tempfile.mkdtemp(prefix="qs-", dir="/tmp")


async def _wait_readable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(sock.fileno(), ready)
    try:
        await future
    finally:
        loop.remove_reader(sock.fileno())


class FakeQMPServer:
    """A scripted QMP server; ``async with`` starts it, ``.path`` is its socket.

    It serves one client at a time (as QEMU's monitor does), checks that ``qmp_capabilities``
    comes first, receives fds passed with SCM_RIGHTS and binds them on ``getfd`` (like QEMU:
    the last fd received goes to the next ``getfd``).
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        greeting: dict[str, Any] | bytes | None = None,
    ) -> None:
        self.script: Script = script if script is not None else {}
        self.greeting = GREETING if greeting is None else greeting
        self.commands: list[dict[str, Any]] = []  # every message received, in order
        self.fds: dict[str, int] = {}  # getfd name -> our copy of the fd
        self.connections = 0
        self._dir = ""
        self.path = ""
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        self._pending_fd: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._send_lock = asyncio.Lock()
        self.connected = asyncio.Event()

    @property
    def names(self) -> list[str]:
        return [str(c.get("execute")) for c in self.commands]

    def args(self, name: str) -> list[dict[str, Any]]:
        return [c.get("arguments", {}) for c in self.commands if c.get("execute") == name]

    async def __aenter__(self) -> FakeQMPServer:
        self._dir = short_tempdir()
        self.path = os.path.join(self._dir, "qmp.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(4)
        listener.setblocking(False)
        self._listener = listener
        self._spawn(self._accept_loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        if self._listener is not None:
            self._listener.close()
        self._close_conn()
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self._pending_fd is not None:
            os.close(self._pending_fd)
            self._pending_fd = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def attach(self, sock: socket.socket) -> None:
        """Serve an already connected socket (e.g. one end of a socketpair)."""
        sock.setblocking(False)
        self._spawn(self._serve(sock))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            await self._serve(conn)

    async def send(self, message: dict[str, Any] | bytes) -> None:
        if self._conn is None:
            return
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\r\n"
        async with self._send_lock:
            with contextlib.suppress(OSError):
                await asyncio.get_running_loop().sock_sendall(self._conn, data)

    async def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send an event to the connected client."""
        await self.send(event_message(name, data))

    def hang_up(self) -> None:
        """Close the client connection (QEMU exiting, say)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            # shutdown, not close: the serving task may be waiting for it to become readable
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    async def _serve(self, conn: socket.socket) -> None:
        self._conn = conn
        self.connections += 1
        self.connected.set()
        negotiated = False
        buffer = b""
        decoder = json.JSONDecoder()
        try:
            await self.send(
                self.greeting if isinstance(self.greeting, bytes) else dict(self.greeting)
            )
            while self._conn is conn:
                try:
                    data, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(8 * 4))
                except BlockingIOError:
                    await _wait_readable(conn)
                    continue
                except OSError:
                    return
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        for fd in memoryview(payload).cast("i"):
                            if self._pending_fd is not None:
                                os.close(self._pending_fd)
                            self._pending_fd = fd
                if not data:
                    return
                buffer += data
                while True:
                    text = buffer.decode(errors="replace").lstrip()
                    if not text:
                        buffer = b""
                        break
                    try:
                        message, end = decoder.raw_decode(text)
                    except ValueError:
                        break  # incomplete: QMPClient sends no newline after a message
                    buffer = text[end:].encode()
                    self.commands.append(message)
                    negotiated = await self._handle(message, negotiated)
                    if self._conn is not conn:
                        return
        finally:
            if self._conn is conn:
                self._conn = None
            conn.close()

    async def _handle(self, message: dict[str, Any], negotiated: bool) -> bool:
        name = message.get("execute")
        ident = {"id": message["id"]} if "id" in message else {}
        if name == "qmp_capabilities":
            if negotiated:
                desc = "Capabilities negotiation is already complete, command ignored"
                await self.send({"error": _err("CommandNotFound", desc), **ident})
            else:
                await self.send({"return": {}, **ident})
            return True
        if not negotiated:
            await self.send(
                {
                    "error": _err(
                        "CommandNotFound",
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                    ),
                    **ident,
                }
            )
            return False
        reply = await self._scripted(str(name), dict(message.get("arguments", {})))
        if reply.hang_up:
            self.hang_up()
            return True
        for event, data in reply.before:
            await self.emit(event, data)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.no_reply:
            return True
        if reply.error is not None:
            await self.send({"error": _err(reply.error.cls, reply.error.desc), **ident})
        else:
            await self.send({"return": reply.value, **ident})
        if reply.after:
            self._spawn(self._emit_later(reply.after, reply.after_delay))
        return True

    async def _emit_later(
        self, events: tuple[tuple[str, dict[str, Any]], ...], delay: float
    ) -> None:
        for event, data in events:
            await asyncio.sleep(delay)
            await self.emit(event, data)

    async def _scripted(self, name: str, arguments: dict[str, Any]) -> Reply:
        if name == "getfd":
            return self._getfd(arguments)
        if name == "closefd":
            if arguments["fdname"] not in self.fds:
                return Reply(error=Error("GenericError", "File descriptor named 'x' not found"))
            os.close(self.fds.pop(arguments["fdname"]))
            return Reply()
        if callable(self.script):
            answer = self.script(name, arguments)
        elif name in self.script:
            answer = self.script[name]
            if callable(answer):
                answer = answer(self, arguments)
        else:
            return Reply(error=Error("CommandNotFound", f"The command {name} has not been found"))
        if inspect.isawaitable(answer):
            answer = await answer
        if isinstance(answer, Reply):
            return answer
        if isinstance(answer, Error):
            return Reply(error=answer)
        return Reply(value=answer)

    def _getfd(self, arguments: dict[str, Any]) -> Reply:
        answer = self.script.get("getfd") if isinstance(self.script, Mapping) else None
        if self._pending_fd is None:
            return Reply(error=Error("GenericError", "No file descriptor supplied via SCM_RIGHTS"))
        fdname = arguments["fdname"]
        if fdname in self.fds:
            os.close(self.fds[fdname])
        self.fds[fdname], self._pending_fd = self._pending_fd, None
        return answer if isinstance(answer, Reply) else Reply()


def _err(cls: str, desc: str) -> dict[str, str]:
    return {"class": cls, "desc": desc}


# --- guest agent ------------------------------------------------------------------------------


class FakeGuestAgent:
    """A scripted qemu-guest-agent: newline-delimited JSON, no greeting.

    Knows ``guest-sync-delimited`` (reply prefixed with 0xFF), ``guest-ping``, the fsfreeze
    commands (tracking ``frozen``) and ``guest-exec``/``guest-exec-status``; ``script`` entries
    override or add commands (same forms as FakeQMPServer's). ``stale`` is sent to every new
    connection first, like replies an earlier client left in the virtio-serial stream.
    """

    def __init__(
        self,
        script: Mapping[str, Any] | None = None,
        *,
        stale: bytes = b"",
        sync: bool = True,
    ) -> None:
        self.script = dict(script or {})
        self.stale = stale
        self.sync = sync  # False: never answer anything
        self.commands: list[dict[str, Any]] = []
        self.frozen = False
        self.connections = 0
        self.exec_results: dict[str, dict[str, Any]] = {}  # path -> guest-exec-status reply
        self.exec_polls = 1  # guest-exec-status calls before the process has exited
        self._dir = ""
        self.path = ""
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pids: dict[int, tuple[str, int]] = {}

    @property
    def names(self) -> list[str]:
        return [str(c.get("execute")) for c in self.commands]

    async def __aenter__(self) -> FakeGuestAgent:
        self._dir = short_tempdir()
        self.path = os.path.join(self._dir, "qga.sock")
        self._server = await asyncio.start_unix_server(self._serve, self.path)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        for writer in list(self._writers):
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._server.wait_closed()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        self.connections += 1
        try:
            if self.stale:
                writer.write(self.stale)
            while True:
                line = await reader.readline()
                if not line:
                    return
                # 0xFF resets the agent's parser: drop what came before it.
                line = line.rsplit(b"\xff", 1)[-1].strip()
                if not line:
                    continue
                message = json.loads(line)
                self.commands.append(message)
                if not self.sync:
                    continue
                reply = await self._answer(message)
                if reply is None:
                    continue
                prefix = b"\xff" if message.get("execute") == "guest-sync-delimited" else b""
                writer.write(prefix + json.dumps(reply).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, message: dict[str, Any]) -> dict[str, Any] | None:
        name = str(message.get("execute"))
        arguments = dict(message.get("arguments", {}))
        if name in self.script:
            answer = self.script[name]
            if callable(answer):
                answer = answer(self, arguments)
            if inspect.isawaitable(answer):
                answer = await answer
        else:
            answer = self._builtin(name, arguments)
        if isinstance(answer, Reply):
            if answer.delay:
                await asyncio.sleep(answer.delay)
            if answer.no_reply:
                return None
            if answer.error is not None:
                return {"error": _err(answer.error.cls, answer.error.desc)}
            return {"return": answer.value}
        if isinstance(answer, Error):
            return {"error": _err(answer.cls, answer.desc)}
        return {"return": answer}

    def _builtin(self, name: str, arguments: dict[str, Any]) -> Any:
        if name in ("guest-sync-delimited", "guest-sync"):
            return arguments["id"]
        if name == "guest-ping":
            return {}
        if name == "guest-fsfreeze-freeze":
            if self.frozen:
                return Error("GenericError", "Command guest-fsfreeze-freeze has been disabled")
            self.frozen = True
            return 2
        if name == "guest-fsfreeze-thaw":
            count = 2 if self.frozen else 0
            self.frozen = False
            return count
        if name == "guest-fsfreeze-status":
            return "frozen" if self.frozen else "thawed"
        if name == "guest-exec":
            pid = 1000 + len(self._pids)
            self._pids[pid] = (arguments["path"], 0)
            return {"pid": pid}
        if name == "guest-exec-status":
            path, polls = self._pids[arguments["pid"]]
            self._pids[arguments["pid"]] = (path, polls + 1)
            if polls < self.exec_polls:
                return {"exited": False}
            return {"exited": True, **self.exec_results.get(path, {"exitcode": 0})}
        return Error("CommandNotFound", f"The command {name} has not been found")
