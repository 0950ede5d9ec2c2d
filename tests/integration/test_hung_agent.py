"""A guest agent that never answers (issue 6, item 5).

A fake agent socket in the test, passed with ``--qga``, to ``create --disk-only --quiesce``
(internal and external) on a QEMU launched "by someone else": the command fails within its
deadline (the engine's QUIESCE_TIMEOUT per agent step) with a one-line error, a thaw is attempted
whenever a freeze was sent, the VM keeps running and nothing half-made remains.  The cases run at
the same time (one VM each): they spend their time waiting for deadlines.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from pathlib import Path

import attrs
import pytest
from foreignvm import QEMUSNAP, ForeignVM, assert_one_line, cli_json
from livevm import check_clean, firmware_config, flush_live, make_disks

from qemusnap.engine import QUIESCE_TIMEOUT
from qemusnap.store import Store

pytestmark = [pytest.mark.qemu_img, pytest.mark.qemu_system]

FREEZE, THAW = "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"


class HungAgent:
    """Poses as qemu-guest-agent on a UNIX socket and records every command it receives.

    ``silent``: answers nothing at all (not even ``guest-sync-delimited``);
    ``no-freeze``: answers everything but ``guest-fsfreeze-freeze`` (a freeze stuck in the guest);
    ``stuck``: answers only ``guest-sync-delimited`` (freeze and thaw both hang).
    """

    def __init__(self, path: Path, mode: str) -> None:
        self.path = path
        self.mode = mode
        self.commands: list[str] = []
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._connections: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn.makefile("rb") as reader:
            for raw in reader:
                line = raw.rsplit(b"\xff", 1)[-1].strip()
                if not line:
                    continue
                message = json.loads(line)
                name = message.get("execute")
                self.commands.append(name)
                reply = self._reply(name, message.get("arguments", {}))
                if reply is not None:
                    conn.sendall(reply)

    def _reply(self, name: str, arguments: dict[str, object]) -> bytes | None:
        if self.mode == "silent":
            return None
        if name == "guest-sync-delimited":
            return b"\xff" + json.dumps({"return": arguments["id"]}).encode() + b"\n"
        if self.mode == "stuck" or name == FREEZE:
            return None
        value: object = 0 if name == THAW else {}
        return json.dumps({"return": value}).encode() + b"\n"

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        for conn in self._connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@attrs.define
class Case:
    kind: str  # --internal | --external
    mode: str  # HungAgent mode
    directory: Path = attrs.field(default=Path())
    vm: ForeignVM | None = None
    agent: HungAgent | None = None
    process: subprocess.Popen[str] | None = None
    elapsed: float = 0.0
    stderr: str = ""

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @property
    def disk(self) -> Path:
        return self.directory / "vda.qcow2"


CASES = [
    Case("--internal", "no-freeze"),
    Case("--internal", "stuck"),
    Case("--external", "no-freeze"),
    Case("--external", "silent"),
]


def test_quiesce_with_a_hung_agent_fails_in_time_and_leaves_nothing(short_tmp: Path) -> None:
    cases = [attrs.evolve(c, directory=short_tmp / f"{c.kind[2:]}-{c.mode}") for c in CASES]
    try:
        for case in cases:
            case.directory.mkdir()
            make_disks(case.directory, ["vda"])
            config = firmware_config([case.disk], qmp_socket=str(case.directory / "qmp.sock"))
            case.vm = ForeignVM(config, case.directory / "qemu.log").start()
            case.agent = HungAgent(case.directory / "qga.sock", case.mode)
            cli_json("--qmp", case.vm.qmp, "list", state=case.state)  # known to the state dir
        before = {c.mode + c.kind: sorted(p.name for p in c.directory.iterdir()) for c in cases}

        started = time.monotonic()
        for case in cases:
            assert case.vm is not None and case.agent is not None
            case.process = subprocess.Popen(
                [*QEMUSNAP, "--state", str(case.state), "--qmp", str(case.vm.qmp),
                 "--qga", str(case.agent.path), "create", "q1", case.kind, "--disk-only",
                 "--quiesce"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
        pending = list(cases)
        while pending:
            for case in list(pending):
                assert case.process is not None
                if case.process.poll() is not None:
                    case.elapsed = time.monotonic() - started
                    case.stderr = case.process.communicate()[1]
                    pending.remove(case)
            assert time.monotonic() - started < 60, f"still running: {pending}"
            time.sleep(0.05)

        for case in cases:
            assert case.vm is not None and case.agent is not None and case.process is not None
            what = f"{case.kind} {case.mode}: {case.stderr}"
            assert case.process.returncode == 1, what
            assert_one_line(case.stderr)
            assert "guest agent" in case.stderr and "did not finish within" in case.stderr, what
            # One deadline for the freeze (or the connection), one more if the thaw hangs too.
            steps = 2 if case.mode == "stuck" else 1
            assert case.elapsed < steps * QUIESCE_TIMEOUT + 15, what
            commands = case.agent.commands
            if case.mode == "silent":
                assert commands == ["guest-sync-delimited"], what
            else:
                assert FREEZE in commands and THAW in commands[commands.index(FREEZE) :], what
            if case.mode == "stuck":
                assert "may still be frozen" in case.stderr, what

            assert case.vm.running(), what
            assert cli_json("--qmp", case.vm.qmp, "list", state=case.state) == [], what
            (chain,) = cli_json("--qmp", case.vm.qmp, "chain", state=case.state)
            assert [i["filename"] for i in chain["images"]] == [str(case.disk)], what
            assert chain["images"][0]["snapshots"] == [], what  # no internal tag
            with Store(case.state) as store:
                assert all(not store.journal(v.id) for v in store.vms()), what
            after = sorted(p.name for p in case.directory.iterdir())
            assert after == before[case.mode + case.kind], what  # no overlay left
            case.vm.monitor(flush_live)
            check_clean(case.disk, in_use=True)
    finally:
        for case in cases:
            if case.process is not None and case.process.poll() is None:
                case.process.kill()
                case.process.wait()
            if case.agent is not None:
                case.agent.close()
            if case.vm is not None:
                case.vm.close()
