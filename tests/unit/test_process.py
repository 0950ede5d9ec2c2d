"""qemusnap.process: exit codes, missing programs, deadlines and cancellation."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from qemusnap.errors import OperationError, OperationTimeout
from qemusnap.process import Completed, ProgramNotFoundError, run, which


@pytest.mark.asyncio
async def test_output_and_stdin() -> None:
    done = await run(["sh", "-c", "cat; echo err >&2"], timeout=10, stdin_data=b"hi\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "hi\n", "err\n")
    assert done.argv == ("sh", "-c", "cat; echo err >&2")


@pytest.mark.asyncio
async def test_failure_reports_last_stderr_line() -> None:
    argv = ["sh", "-c", "echo first >&2; echo 'the reason' >&2; exit 3"]
    with pytest.raises(OperationError, match=r"sh failed: the reason$"):
        await run(argv, timeout=10)
    done = await run(argv, timeout=10, check=False)
    assert done.returncode == 3


@pytest.mark.asyncio
async def test_failure_uses_the_error_factory() -> None:
    class Boom(OperationError):
        pass

    def factory(done: Completed) -> Boom:
        return Boom(f"rc={done.returncode} {done.stdout.strip()}")

    with pytest.raises(Boom, match="rc=4 out"):
        await run(["sh", "-c", "echo out; exit 4"], timeout=10, error=factory)


@pytest.mark.asyncio
async def test_env() -> None:
    done = await run(["sh", "-c", "echo $QS_X"], timeout=10, env={"QS_X": "y"})
    assert done.stdout == "y\n"


@pytest.mark.asyncio
async def test_missing_program(tmp_path: Path) -> None:
    with pytest.raises(ProgramNotFoundError, match="qemu-img not found: install qemu-utils"):
        await run([str(tmp_path / "qemu-img"), "info"], timeout=10)


def test_which(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QS_TEST_BIN", raising=False)
    assert which("sh", "QS_TEST_BIN") == os.path.abspath(str(which("sh")))
    fake = tmp_path / "my-qemu-img"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("QS_TEST_BIN", str(fake))
    assert which("qemu-img", "QS_TEST_BIN") == str(fake)
    monkeypatch.setenv("QS_TEST_BIN", str(tmp_path / "absent"))
    with pytest.raises(ProgramNotFoundError, match=r"QS_TEST_BIN=.*absent is not an executable"):
        which("qemu-img", "QS_TEST_BIN")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("QS_TEST_BIN")
    with pytest.raises(ProgramNotFoundError, match=r"qemu-img not found in PATH \(or set QS_"):
        which("qemu-img", "QS_TEST_BIN")


def _sleeper(pid_file: Path) -> list[str]:
    # exec keeps the pid, so the pid file names the process run() started
    return ["sh", "-c", f'echo $$ > "{pid_file}"; exec sleep 30']


def _gone(pid_file: Path) -> bool:
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.asyncio
async def test_timeout_kills_and_reaps(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    start = time.monotonic()
    with pytest.raises(OperationTimeout, match=r"sh did not finish within 0\.3 s") as info:
        await run(_sleeper(pid_file), timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 5
    assert _gone(pid_file)  # killed and reaped: not even a zombie


@pytest.mark.asyncio
async def test_cancellation_kills_and_reaps(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    task = asyncio.create_task(run(_sleeper(pid_file), timeout=60))
    for _ in range(1000):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert _gone(pid_file)


@pytest.mark.asyncio
async def test_outer_timeout_is_not_wrapped(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    # The caller's own deadline cancels run(); that is the caller's TimeoutError, not ours.
    with pytest.raises(TimeoutError) as info:
        async with asyncio.timeout(0.3):
            await run(_sleeper(pid_file), timeout=60)
    assert not isinstance(info.value, OperationTimeout)
    assert _gone(pid_file)
