"""Embedding helpers for test harnesses: "golden snapshot, test, revert".

::

    async with await VM.launch(config) as vm:
        await golden(vm, "golden")              # the fastest correct kind for this VM
        for test in tests:
            report = await reset(vm, "golden")  # back to the golden state
            await test(vm)

        async with restore_point(vm, "before-upgrade"):
            ...                                 # whatever happens here is undone on exit

The fastest reset is an internal checkpoint (``snapshot-save``/``snapshot-load``): RAM, device
state and every disk come back inside the same QEMU process, no restart. It needs every writable
disk to be qcow2 (one of them holds the RAM); otherwise the golden state is an external
checkpoint (overlays plus a memory file) and a reset restarts QEMU from it.

:class:`SyncVM` drives a VM from synchronous code (a pytest test, a unittest case): it runs an
event loop in a background thread, and every method waits for its result with a deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from .agent import ExecResult, GuestAgent
from .engine import DEFAULT_TIMEOUT, VM
from .engine.resets import (
    DISK_ONLY_RESTART,
    EXTERNAL_RESTART,
    IN_PLACE,
    ResetReport,
    golden,
    reset,
    reset_method,
    restore_point,
    supports_in_place,
)
from .errors import (
    GuestAgentError,
    OperationTimeout,
    UnsupportedError,
)
from .machine import MachineConfig, wait_pid_exit
from .models import Snapshot
from .monitor import Monitor

__all__ = [
    "DISK_ONLY_RESTART",
    "EXTERNAL_RESTART",
    "IN_PLACE",
    "AsyncVM",
    "ResetReport",
    "SyncVM",
    "golden",
    "reset",
    "reset_method",
    "restore_point",
    "supports_in_place",
]

log = logging.getLogger("qemusnap.harness")

_T = TypeVar("_T")

# --- synchronous use ----------------------------------------------------------------------------

#: How much longer than its own deadline the calling thread waits for a call to come back.
_GRACE = 30.0


class _LoopThread:
    """An asyncio event loop running in a daemon thread; coroutines are submitted to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name="qemusnap-loop", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float, what: str) -> _T:
        """Run ``coro`` in the loop and wait for it: at most ``timeout`` seconds."""

        async def bounded() -> _T:
            try:
                async with asyncio.timeout(timeout) as scope:
                    return await coro
            except TimeoutError:
                if scope.expired():
                    raise OperationTimeout(f"{what} did not finish within {timeout:g} s") from None
                raise

        future = asyncio.run_coroutine_threadsafe(bounded(), self.loop)
        try:
            return future.result(timeout + _GRACE)
        except TimeoutError:
            if future.done():
                raise  # the coroutine's own (Operation)Timeout
            future.cancel()
            raise OperationTimeout(f"{what} did not come back within {timeout:g} s") from None
        except BaseException:
            future.cancel()  # e.g. KeyboardInterrupt: do not leave it running behind our back
            raise

    def stop(self) -> None:
        """Cancel what is left, close the loop and end the thread (idempotent)."""
        if self.loop.is_closed():
            return

        async def finish() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            asyncio.run_coroutine_threadsafe(finish(), self.loop).result(_GRACE)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            log.warning("the qemusnap event loop did not wind down in time")
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(_GRACE)
        if not self._thread.is_alive():
            self.loop.close()


class SyncVM:
    """A :class:`~qemusnap.VM` for synchronous code; a context manager that closes it.

    The VM lives in an event loop in a background thread; each method runs one coroutine there
    and waits for it, bounded by its ``timeout``.  :meth:`call` runs any coroutine of the VM.
    """

    def __init__(self, vm: VM, loop: _LoopThread, *, config: MachineConfig | None = None) -> None:
        self._vm = vm
        self._loop = loop
        #: What the VM was launched from (None for an attached VM).
        self.config = config
        #: The last :meth:`reset` (None before the first).
        self.last_reset: ResetReport | None = None

    @classmethod
    def launch(
        cls,
        config: MachineConfig,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        paused: bool = False,
        timeout: float = 60.0,
    ) -> SyncVM:
        """Start QEMU from ``config`` (see :meth:`VM.launch`); :meth:`close` shuts it down."""
        loop = _LoopThread()
        try:
            vm = loop.run(
                VM.launch(config, state_dir=state_dir, paused=paused, timeout=timeout),
                timeout + 5.0,
                "launching QEMU",
            )
        except BaseException:
            loop.stop()
            raise
        return cls(vm, loop, config=config)

    @classmethod
    def attach(
        cls,
        qmp_socket: str,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        qga_socket: str | None = None,
        timeout: float = 30.0,
    ) -> SyncVM:
        """Open a running QEMU by its QMP socket path (see :meth:`VM.attach`)."""
        loop = _LoopThread()
        try:
            vm = loop.run(
                VM.attach(qmp_socket, state_dir=state_dir, qga_socket=qga_socket, timeout=timeout),
                timeout + 5.0,
                f"attaching to {qmp_socket}",
            )
        except BaseException:
            loop.stop()
            raise
        return cls(vm, loop)

    def close(self, *, timeout: float = 60.0) -> None:
        """Close the VM (a launched QEMU is shut down) and stop the loop (idempotent)."""
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(self._vm.close(), timeout, "closing the VM")
        finally:
            self._loop.stop()

    def __enter__(self) -> SyncVM:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, fn: Callable[[VM], Awaitable[_T]], *, timeout: float = DEFAULT_TIMEOUT) -> _T:
        """``await fn(vm)`` in the VM's event loop and return its result."""

        async def run() -> _T:
            return await fn(self._vm)

        return self._loop.run(run(), timeout, getattr(fn, "__name__", "a call"))

    # --- snapshots ------------------------------------------------------------------------------

    def create(self, name: str, *, timeout: float = DEFAULT_TIMEOUT, **options: Any) -> Snapshot:
        """Take snapshot ``name``; ``options`` as for :meth:`VM.create`."""
        return self._loop.run(
            self._vm.create(name, timeout=timeout, **options), timeout, f"create {name}"
        )

    def revert(
        self,
        name: str,
        *,
        running: bool = False,
        paused: bool = False,
        force: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Snapshot:
        return self._loop.run(
            self._vm.revert(name, running=running, paused=paused, force=force, timeout=timeout),
            timeout,
            f"revert {name}",
        )

    def delete(
        self,
        name: str,
        *,
        children: bool = False,
        children_only: bool = False,
        metadata_only: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> list[str]:
        return self._loop.run(
            self._vm.delete(
                name,
                children=children,
                children_only=children_only,
                metadata_only=metadata_only,
                timeout=timeout,
            ),
            timeout,
            f"delete {name}",
        )

    def snapshots(self, *, timeout: float = 30.0) -> list[Snapshot]:
        return self.call(_snapshots, timeout=timeout)

    def info(self, name: str, *, timeout: float = 30.0) -> Snapshot:
        async def info(vm: VM) -> Snapshot:
            return vm.info(name)

        return self.call(info, timeout=timeout)

    def golden(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> Snapshot:
        """See :func:`golden`."""
        return self._loop.run(golden(self._vm, name, timeout=timeout), timeout, f"golden {name}")

    def reset(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> ResetReport:
        """See :func:`reset`; the report is also kept in :attr:`last_reset`."""
        self.last_reset = self._loop.run(
            reset(self._vm, name, timeout=timeout), timeout, f"reset to {name}"
        )
        return self.last_reset

    # --- QEMU and the guest -------------------------------------------------------------------

    def qmp(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 30.0
    ) -> Any:
        """Run a QMP command and return its ``return`` value."""
        return self._loop.run(
            self._monitor().execute(command, arguments, timeout=timeout), timeout, command
        )

    def hmp(self, command_line: str, *, timeout: float = 30.0) -> str:
        """Run a human monitor command and return its text output."""
        return self._loop.run(
            self._monitor().human_monitor_command(command_line, timeout=timeout),
            timeout,
            command_line,
        )

    def guest_exec(
        self, path: str, args: Sequence[str] = (), *, timeout: float = 60.0
    ) -> ExecResult:
        """Run a program in the guest through its agent (``guest-exec``) and wait for it."""

        async def run() -> ExecResult:
            async with GuestAgent(self._qga_socket(), timeout=timeout) as agent:
                return await agent.exec(path, args, timeout=timeout)

        return self._loop.run(run(), timeout, f"guest-exec {path}")

    def shell(self, script: str, *, timeout: float = 60.0) -> ExecResult:
        """Run ``/bin/sh -c script`` in the guest (see :meth:`guest_exec`)."""
        return self.guest_exec("/bin/sh", ["-c", script], timeout=timeout)

    def wait_for_agent(self, *, timeout: float = 120.0) -> float:
        """Wait until the guest agent answers (e.g. the guest has booted); return the seconds.

        :raise OperationTimeout: it did not answer within ``timeout`` seconds.
        """
        socket = self._qga_socket()

        async def wait() -> float:
            start = time.monotonic()
            while True:
                try:
                    # One attempt: a guest-sync-delimited the agent answers once it runs.
                    async with GuestAgent(socket, timeout=5.0) as agent:
                        await agent.ping()
                    return time.monotonic() - start
                except (GuestAgentError, OperationTimeout):
                    await asyncio.sleep(0.2)

        return self._loop.run(wait(), timeout, "waiting for the guest agent")

    def stop(self, *, timeout: float = 60.0) -> None:
        """Shut the VM's QEMU down, whoever started it (``quit``, then the process is waited
        for), and close it.  :meth:`close` leaves a QEMU it did not launch (a clone) running."""
        if self._loop.loop.is_closed():
            return
        try:
            self._loop.run(_quit(self._vm), timeout, "stopping QEMU")
        finally:
            self.close(timeout=timeout)

    def _retarget(self, vm: VM, config: MachineConfig | None) -> VM:
        """Point this handle at another VM of the same event loop; returns the old one."""
        old, self._vm, self.config = self._vm, vm, config
        self.last_reset = None
        return old

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the VM lives in (see :class:`AsyncVM`)."""
        return self._loop.loop

    def _monitor(self) -> Monitor:
        if self._vm.monitor is None:
            raise UnsupportedError("the VM is not running: no QMP monitor")
        return self._vm.monitor

    def _qga_socket(self) -> str:
        if not self._vm.qga_socket:
            raise UnsupportedError(
                "this VM has no guest agent socket (MachineConfig.qga_socket, or qga_socket=)"
            )
        return self._vm.qga_socket


async def _snapshots(vm: VM) -> list[Snapshot]:
    return vm.snapshots()


async def _quit(vm: VM) -> None:
    if vm.monitor is None:
        return
    pid = vm.monitor.peer_pid()
    if vm.machine is not None:
        await vm.machine.shutdown()
        return
    with contextlib.suppress(Exception):  # QEMU closes the connection as it quits
        await vm.monitor.quit()
    if pid is not None:
        await wait_pid_exit(pid, 30.0)


class AsyncVM:
    """A :class:`SyncVM`'s VM for ``async def`` code running in *another* event loop (a
    pytest-asyncio test): each coroutine runs in the VM's own loop and is awaited from the
    caller's, so the VM works whatever loop (and loop scope) the test has.

    ::

        async def test_it(qemusnap_afresh):
            assert (await qemusnap_afresh.shell("uname")).exitcode == 0
            await qemusnap_afresh.call(lambda vm: vm.create("mine"))   # any VM coroutine
    """

    def __init__(self, sync: SyncVM) -> None:
        self.sync = sync

    @property
    def config(self) -> MachineConfig | None:
        return self.sync.config

    @property
    def last_reset(self) -> ResetReport | None:
        return self.sync.last_reset

    async def _run(self, fn: Callable[[], _T]) -> _T:
        # The SyncVM methods bound their work with deadlines; run one in a worker thread so
        # this loop stays free while the VM's loop works.
        return await asyncio.to_thread(fn)

    async def call(
        self, fn: Callable[[VM], Awaitable[_T]], *, timeout: float = DEFAULT_TIMEOUT
    ) -> _T:
        """``await fn(vm)`` in the VM's event loop (``vm`` is the :class:`~qemusnap.VM`)."""
        return await self._run(lambda: self.sync.call(fn, timeout=timeout))

    async def create(self, name: str, **options: Any) -> Snapshot:
        return await self._run(lambda: self.sync.create(name, **options))

    async def revert(self, name: str, **options: Any) -> Snapshot:
        return await self._run(lambda: self.sync.revert(name, **options))

    async def delete(self, name: str, **options: Any) -> list[str]:
        return await self._run(lambda: self.sync.delete(name, **options))

    async def snapshots(self) -> list[Snapshot]:
        return await self._run(self.sync.snapshots)

    async def golden(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> Snapshot:
        return await self._run(lambda: self.sync.golden(name, timeout=timeout))

    async def reset(self, name: str, *, timeout: float = DEFAULT_TIMEOUT) -> ResetReport:
        return await self._run(lambda: self.sync.reset(name, timeout=timeout))

    async def qmp(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout: float = 30
    ) -> Any:
        return await self._run(lambda: self.sync.qmp(command, arguments, timeout=timeout))

    async def hmp(self, command_line: str, *, timeout: float = 30.0) -> str:
        return await self._run(lambda: self.sync.hmp(command_line, timeout=timeout))

    async def guest_exec(
        self, path: str, args: Sequence[str] = (), *, timeout: float = 60.0
    ) -> ExecResult:
        return await self._run(lambda: self.sync.guest_exec(path, args, timeout=timeout))

    async def shell(self, script: str, *, timeout: float = 60.0) -> ExecResult:
        return await self._run(lambda: self.sync.shell(script, timeout=timeout))
