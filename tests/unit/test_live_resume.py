"""The live checkpoint's resume (``Saver.run(resume_when_armed=True)``) against a fake QMP
server playing QEMU's background snapshot: ``cont`` only once RAM pages are counted, only if
QEMU did not resume the guest itself (QEMU 8+), never on 7.2 where its ``RESUME`` event came
first; the polls go back to back and nothing else is asked in between (every round trip is
guest pause)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

import pytest
from fake_qmp import FakeQMPServer, Reply

from qemusnap.capabilities import MemoryMechanism, Transport
from qemusnap.memory import Saver
from qemusnap.models import MemoryFormat
from qemusnap.monitor import Monitor


def script(qemu_resumes: bool, pages_after: int = 2) -> dict[str, Any]:
    """``qemu_resumes``: QEMU 7.2, whose bottom half ran ``vm_start()`` (``RESUME`` event)
    before the reply that first counts pages."""
    polls = {"n": 0}

    def query_migrate(server: FakeQMPServer, _: dict[str, Any]) -> Reply:
        polls["n"] += 1
        if "cont" in server.names or polls["n"] > 6:
            return Reply({"status": "completed", "ram": {"normal": 10, "duplicate": 5}})
        pages = 7 if polls["n"] > pages_after else 0
        resume = (("RESUME", {}),) if qemu_resumes and polls["n"] == pages_after + 1 else ()
        return Reply({"status": "active", "ram": {"normal": pages, "duplicate": 0}}, before=resume)

    return {
        "migrate": {},
        "query-migrate": query_migrate,
        "query-status": {"status": "paused", "running": False},
        "cont": {},
    }


async def saved(server_script: dict[str, Any], resume: bool) -> list[str]:
    async with asyncio.timeout(20):
        fd, path = tempfile.mkstemp()
        try:
            async with (
                FakeQMPServer(server_script) as server,
                await Monitor.connect(server.path) as mon,
            ):
                mechanism = MemoryMechanism(Transport.FILE, MemoryFormat.STREAM)
                saver = Saver(mon, path, fd, mechanism, "file:/dev/fdset/0")
                await saver.run(timeout=10, resume_when_armed=resume)
                return [n for n in server.names if n != "qmp_capabilities"]
        finally:
            os.close(fd)
            os.unlink(path)


@pytest.mark.asyncio
async def test_paused_guest_is_resumed_once_pages_are_counted() -> None:
    names = await saved(script(qemu_resumes=False), resume=True)
    # Two polls without pages, the third counts pages: then at once cont (no query-status).
    assert names[:5] == ["migrate", "query-migrate", "query-migrate", "query-migrate", "cont"]
    assert names[-1] == "query-migrate"  # waits for completion after resuming
    assert "query-status" not in names


@pytest.mark.parametrize(("qemu_resumes", "resume"), [(True, True), (False, False)])
@pytest.mark.asyncio
async def test_no_cont_when_qemu_resumed_or_not_asked(qemu_resumes: bool, resume: bool) -> None:
    names = await saved(script(qemu_resumes), resume=resume)
    assert "cont" not in names
    assert "query-status" not in names
