"""The live checkpoint's resume (``Saver.run(resume_when_armed=True)``) against a fake QMP
server playing QEMU's background snapshot: ``cont`` only once RAM pages are counted, only if
the guest is still paused (QEMU 8+), never on 7.2 where QEMU resumed it itself."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import pytest
from fake_qmp import FakeQMPServer, run

from qemusnap.capabilities import MemoryMechanism, Transport
from qemusnap.memory import Saver
from qemusnap.models import MemoryFormat
from qemusnap.monitor import Monitor


def script(run_state: str, pages_after: int = 2) -> dict[str, Any]:
    polls = {"n": 0}

    def query_migrate(server: FakeQMPServer, _: dict[str, Any]) -> dict[str, Any]:
        polls["n"] += 1
        if "cont" in server.names or polls["n"] > 6:
            return {"status": "completed", "ram": {"normal": 10, "duplicate": 5}}
        pages = 7 if polls["n"] > pages_after else 0
        return {"status": "active", "ram": {"normal": pages, "duplicate": 0}}

    return {
        "migrate": {},
        "query-migrate": query_migrate,
        "query-status": {"status": run_state, "running": run_state == "running"},
        "cont": {},
    }


def saved(server_script: dict[str, Any], resume: bool) -> list[str]:
    async def scenario() -> list[str]:
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

    result: list[str] = run(scenario())
    return result


def test_paused_guest_is_resumed_once_pages_are_counted() -> None:
    names = saved(script("paused"), resume=True)
    # Two polls without pages, the third counts pages: then the run state, then cont.
    assert names[:4] == ["migrate", "query-migrate", "query-migrate", "query-migrate"]
    assert names[4:6] == ["query-status", "cont"]
    assert names[-1] == "query-migrate"  # waits for completion after resuming


@pytest.mark.parametrize(("state", "resume"), [("running", True), ("paused", False)])
def test_no_cont_when_qemu_resumed_or_not_asked(state: str, resume: bool) -> None:
    names = saved(script(state), resume=resume)
    assert "cont" not in names
    if not resume:
        assert "query-status" not in names
