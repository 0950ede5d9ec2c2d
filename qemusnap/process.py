"""Subprocess helpers on :func:`asyncio.create_subprocess_exec` (argv lists, never a shell).

Every run has a deadline. A process outlived by its deadline, or whose caller is cancelled, is
killed and reaped before the error (or the cancellation) propagates, so nothing keeps running
behind qemusnap's back.
"""

# Every public coroutine takes a timeout (DESIGN.md), which ASYNC109 would forbid.

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import shutil
from collections.abc import Callable, Mapping, Sequence

import attrs

from .errors import OperationError, OperationTimeout, ProgramNotFoundError

__all__ = ["Completed", "ProgramNotFoundError", "run", "which"]

log = logging.getLogger(__name__)

# Debian package that ships each program, for "not found" messages.
_PACKAGES = {
    "qemu-img": "qemu-utils",
    "qemu-io": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-ga": "qemu-guest-agent",
}


def _not_found(program: str, detail: str | None = None) -> ProgramNotFoundError:
    name = os.path.basename(program)
    package = _PACKAGES.get(name)
    message = detail or f"{name} not found"
    if package:
        message += f": install {package}"
    return ProgramNotFoundError(message, program=program)


@attrs.frozen
class Completed:
    """A finished process."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def command(self) -> str:
        """The command line, quoted for a shell (for messages only)."""
        return shlex.join(self.argv)


ErrorFactory = Callable[[Completed], BaseException]


def which(name: str, env_var: str | None = None) -> str:
    """The path of program *name*: from ``$env_var`` when set (a path or a name), else PATH."""
    if env_var and (override := os.environ.get(env_var)):
        found = shutil.which(override)
        if found is None:
            raise _not_found(name, f"{env_var}={override} is not an executable program")
        return os.path.abspath(found)
    found = shutil.which(name)
    if found is None:
        hint = f" (or set {env_var})" if env_var else ""
        raise _not_found(name, f"{name} not found in PATH{hint}")
    return os.path.abspath(found)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill *proc* and wait for it, draining its pipes so the transport closes cleanly."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    # SIGKILL cannot be caught, so this ends quickly; unread pipe data is discarded.
    await proc.communicate()


async def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    stdin_data: bytes | None = None,
    env: Mapping[str, str] | None = None,
    error: ErrorFactory | None = None,
) -> Completed:
    """Run *argv* to completion within *timeout* seconds and return its output.

    With *check*, a non-zero exit raises ``error(completed)`` if given, else an
    :class:`OperationError` with the last line of stderr. A missing program raises
    :class:`ProgramNotFoundError`; a deadline :class:`OperationTimeout`.
    """
    args = tuple(str(a) for a in argv)
    if not args:
        raise ValueError("empty argv")
    log.debug("run: %s", shlex.join(args))
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.PIPE if stdin_data is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env) if env is not None else None,
        )
    except FileNotFoundError as exc:
        raise _not_found(args[0]) from exc
    except OSError as exc:
        raise OperationError(f"cannot run {args[0]}: {exc.strerror or exc}") from exc

    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate(stdin_data)
    except TimeoutError as exc:
        await _kill(proc)
        raise OperationTimeout(
            f"{os.path.basename(args[0])} did not finish within {timeout:g} s: {shlex.join(args)}"
        ) from exc
    except BaseException:  # cancellation (or KeyboardInterrupt): never leave it running
        await _kill(proc)
        raise

    assert proc.returncode is not None
    done = Completed(
        argv=args,
        returncode=proc.returncode,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
    )
    log.debug("exit %d: %s", done.returncode, args[0])
    if check and done.returncode != 0:
        if error is not None:
            raise error(done)
        detail = _last_line(done.stderr) or f"exit status {done.returncode}"
        raise OperationError(f"{os.path.basename(args[0])} failed: {detail}")
    return done
