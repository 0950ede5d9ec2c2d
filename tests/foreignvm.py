"""A QEMU launched "by someone else" (plain ``qemu-system-x86_64`` with a QMP socket path) and
the qemusnap command line run against it as a subprocess, as users and the acceptance tests do.

A revert may restart that QEMU from its recorded command line: :meth:`ForeignVM.close` kills
whichever QEMU process serves the QMP socket by then (found by its peer credentials), and the one
it started itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs

from qemusnap.machine import MachineConfig
from qemusnap.monitor import Monitor

QEMUSNAP = [sys.executable, "-m", "qemusnap"]
T = TypeVar("T")


def cli(
    *args: str | Path,
    state: Path,
    expect: int | tuple[int, ...] = 0,
    env: Mapping[str, str] | None = None,
    umask: int = -1,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run ``qemusnap --state STATE ARGS``; check the exit status, and for a failure that stderr
    holds exactly one line and no traceback."""
    done = subprocess.run(
        [*QEMUSNAP, "--state", str(state), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env} if env is not None else None,
        umask=umask,
        cwd=cwd,
    )
    expected = expect if isinstance(expect, tuple) else (expect,)
    assert done.returncode in expected, (
        f"{args}: exit {done.returncode}, wanted {expect}\n{done.stdout}\n{done.stderr}"
    )
    if done.returncode:
        assert_one_line(done.stderr)
    return done


def cli_json(*args: str | Path, state: Path, **kwargs: Any) -> Any:
    return json.loads(cli("--json", *args, state=state, **kwargs).stdout)


def assert_one_line(stderr: str) -> None:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, f"not one line on stderr:\n{stderr}"


def peer_pid(sock: Path | str) -> int:
    """PID of the process listening on a UNIX socket (SO_PEERCRED of a connection to it)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        creds = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[0])


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


def tree_digest(root: Path, *, skip: Sequence[Path] = ()) -> dict[str, str]:
    """Relative path -> sha256 (or the kind, for what is not a regular file) of everything
    under ``root`` but ``skip``: the "nothing changed on disk" oracle."""
    digest: dict[str, str] = {}
    skipped = {p.resolve() for p in skip}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if (here / d).resolve() not in skipped]
        for name in [*dirnames, *filenames]:
            path = here / name
            key = str(path.relative_to(root))
            if path.is_symlink() or not path.is_file():
                digest[key] = "dir" if path.is_dir() else "other"
            else:
                digest[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


@attrs.define
class ForeignVM:
    """``qemu-system-x86_64`` started from ``config.argv()`` (``config.qmp_socket`` set), not by
    qemusnap; as ``user``:``group`` when given (``setpriv``)."""

    config: MachineConfig
    log: Path
    user: str | None = None
    group: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def qmp(self) -> Path:
        assert self.config.qmp_socket is not None
        return Path(self.config.qmp_socket)

    def start(self) -> ForeignVM:
        argv = self.config.argv()
        if self.user is not None:
            group = self.group or self.user
            argv = ["setpriv", f"--reuid={self.user}", f"--regid={group}", "--clear-groups",
                    *argv]  # fmt: skip
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
            )
        wait_until(self._answers, f"QMP socket {self.qmp}")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"QEMU exited {self.process.returncode}: {self.log.read_text()}")
        try:
            peer_pid(self.qmp)
        except OSError:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            pid = peer_pid(self.qmp)
            if self.process is None or pid != self.process.pid:
                os.kill(pid, signal.SIGKILL)  # a QEMU qemusnap restarted (revert)
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> ForeignVM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def monitor(self, action: Callable[[Monitor], Awaitable[T]]) -> T:
        """Run ``action`` on a fresh QMP connection (no qemusnap process may hold the monitor:
        QEMU serves one QMP client at a time)."""

        async def run() -> T:
            async with await Monitor.connect(str(self.qmp)) as monitor:
                return await action(monitor)

        return asyncio.run(run())

    def status(self) -> str:
        return self.monitor(lambda m: m.query_status()).status

    def running(self) -> bool:
        return self.status() == "running"


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``) mounted on ``directory`` for the block."""
    directory.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", directory],
                   check=True)  # fmt: skip
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", directory], check=False)


def fill(directory: Path, *, leave: int = 0) -> Path:
    """Fill the filesystem of ``directory`` with one file, leaving ``leave`` bytes free."""
    filler = directory / "filler"
    st = os.statvfs(directory)
    room = st.f_bavail * st.f_frsize - leave
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        while room > 0:
            try:
                room -= os.write(fd, b"\xa5" * min(1 << 20, room))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    return filler
