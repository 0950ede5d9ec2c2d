"""Monitor against a fake QMP server: protocol, errors, deadlines, events, jobs, fd passing."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import pytest
from fake_qmp import Error, FakeQMPServer, Reply, short_tempdir

from qemusnap.errors import (
    CommandError,
    JobError,
    MonitorConnectError,
    MonitorError,
    OperationTimeout,
)
from qemusnap.models import Disk
from qemusnap.monitor import Monitor, RunStatus


def status_event(job_id: str, *statuses: str) -> tuple[tuple[str, dict[str, Any]], ...]:
    return tuple(("JOB_STATUS_CHANGE", {"status": s, "id": job_id}) for s in statuses)


class FakeJobs:
    """QEMU's job bookkeeping, just enough for run_job/run_block_job."""

    def __init__(self) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}

    def query_jobs(self, server: FakeQMPServer, args: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"id": jid, "type": "x", **info} for jid, info in self.jobs.items()]

    def dismiss(self, server: FakeQMPServer, args: dict[str, Any]) -> Any:
        job = self.jobs.get(args["id"])
        if job is None or job["status"] != "concluded":
            return Error("GenericError", f"Job '{args['id']}' in state '...' cannot accept dismiss")
        del self.jobs[args["id"]]
        return Reply({}, after=status_event(args["id"], "null"))

    def cancel(self, server: FakeQMPServer, args: dict[str, Any]) -> Any:
        jid = args.get("id") or args["device"]
        if jid not in self.jobs:
            return Error("DeviceNotActive", f"No active block job on device '{jid}'")
        self.jobs[jid]["status"] = "concluded"
        self.jobs[jid]["error"] = "Operation cancelled"
        return Reply({}, after=status_event(jid, "aborting", "concluded"))

    def script(self, **extra: Any) -> dict[str, Any]:
        return {
            "query-jobs": self.query_jobs,
            "job-dismiss": self.dismiss,
            "job-cancel": self.cancel,
            "block-job-cancel": self.cancel,
            **extra,
        }

    def snapshot_job(self, error: str | None = None, *, finish: bool = True) -> Any:
        def start(server: FakeQMPServer, args: dict[str, Any]) -> Reply:
            jid = args["job-id"]
            self.jobs[jid] = {"status": "running"}
            events = status_event(jid, "created", "running")
            if finish:
                self.jobs[jid] = {"status": "concluded"}
                if error:
                    self.jobs[jid]["error"] = error
                    events += status_event(jid, "aborting", "concluded")
                else:
                    events += status_event(jid, "waiting", "pending", "concluded")
            return Reply({}, after=events)

        return start


@pytest.mark.asyncio
async def test_connect_sends_qmp_capabilities_first() -> None:
    async with asyncio.timeout(20):
        async with (
            FakeQMPServer({"query-status": {"status": "running", "running": True}}) as server,
            await Monitor.connect(server.path) as mon,
        ):
            assert await mon.query_status() == RunStatus("running", True)
            assert server.names == ["qmp_capabilities", "query-status"]
            assert server.commands[0].get("arguments") == {"enable": ["oob"]}
            assert mon.qemu_version == (7, 2, 0)
            assert mon.connected
        assert not mon.connected


@pytest.mark.asyncio
async def test_fake_server_insists_on_qmp_capabilities_first() -> None:
    async with asyncio.timeout(20):
        async with FakeQMPServer({"query-status": {}}) as server:
            reader, writer = await asyncio.open_unix_connection(server.path)
            try:
                assert b'"QMP"' in await reader.readline()
                writer.write(b'{"execute": "query-status", "id": 1}')
                reply = await reader.readline()
                assert b"CommandNotFound" in reply
                assert b"qmp_capabilities" in reply
            finally:
                writer.close()
                await writer.wait_closed()


@pytest.mark.asyncio
async def test_command_error_carries_class_and_description() -> None:
    async with asyncio.timeout(20):
        script = {"block_resize": Error("DeviceNotFound", "Device 'nope' not found")}
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            with pytest.raises(CommandError) as info:
                await mon.execute("block_resize", {"device": "nope", "size": 1})
            assert info.value.command == "block_resize"
            assert info.value.error_class == "DeviceNotFound"
            assert info.value.description == "Device 'nope' not found"
            assert isinstance(info.value, MonitorError)
            # unknown command, as QEMU words it
            with pytest.raises(CommandError, match="CommandNotFound"):
                await mon.execute("no-such-command")


@pytest.mark.asyncio
async def test_timeout_raises_operation_timeout_and_connection_stays_usable() -> None:
    async with asyncio.timeout(20):
        script = {"slow": Reply("late", delay=0.4), "fast": "ok"}
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            started = time.monotonic()
            with pytest.raises(OperationTimeout) as info:
                await mon.execute("slow", timeout=0.1)
            assert time.monotonic() - started < 0.35
            assert isinstance(info.value, TimeoutError)
            assert "slow" in str(info.value)
            # the late reply to "slow" is dropped; the next command gets its own reply
            assert await mon.execute("fast") == "ok"


@pytest.mark.asyncio
async def test_cancellation_propagates_unwrapped() -> None:
    async with asyncio.timeout(20):
        script = {"hang": Reply(no_reply=True), "fast": "ok"}
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            task = asyncio.create_task(mon.execute("hang"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await mon.execute("fast") == "ok"


@pytest.mark.asyncio
async def test_outer_timeout_is_not_mistaken_for_ours() -> None:
    async with asyncio.timeout(20):
        script = {"hang": Reply(no_reply=True)}
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            with pytest.raises(TimeoutError) as info:
                async with asyncio.timeout(0.05):
                    await mon.execute("hang", timeout=10)
            assert not isinstance(info.value, OperationTimeout)  # asyncio's own, not wrapped


@pytest.mark.asyncio
async def test_connection_closed_mid_command() -> None:
    async with asyncio.timeout(20):
        script = {"query-status": Reply(hang_up=True)}
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            with pytest.raises(MonitorError) as info:
                await mon.execute("query-status")
            assert not isinstance(info.value, CommandError)
            assert "QEMU closed the QMP connection during query-status" in str(info.value)
            await asyncio.sleep(0.01)
            with pytest.raises(MonitorError, match="closed"):
                await mon.execute("query-status")
            assert not mon.connected
        await mon.close()  # idempotent, swallows the EOF


@pytest.mark.asyncio
async def test_execute_after_close() -> None:
    async with asyncio.timeout(20):
        async with FakeQMPServer() as server:
            mon = await Monitor.connect(server.path)
            await mon.close()
            with pytest.raises(MonitorError, match="closed"):
                await mon.execute("query-status")


@pytest.mark.asyncio
async def test_listener_registered_before_command_sees_fast_event() -> None:
    async with asyncio.timeout(20):
        # QEMU emits RESUME before its reply to cont.
        script = {
            "cont": Reply({}, before=(("RESUME", {}),)),
            "stop": Reply({}, before=(("STOP", {}),)),
        }
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            await mon.stop()  # STOP arrives while nobody listens: not seen below
            async with mon.listen("RESUME", "STOP") as waiter:
                assert len(mon._client._listeners) == 1
                await mon.cont()
                event = await waiter.wait("RESUME", timeout=1)
                assert event["event"] == "RESUME"
                assert event["data"] == {}
                assert set(event["timestamp"]) == {"seconds", "microseconds"}
                assert waiter.drain() == []
                await server.emit("STOP")
                await server.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
                await mon.execute("cont")
                assert [e["event"] for e in waiter.drain()] == ["STOP", "RESUME"]
            # unregistered on exit: qemu.qmp keeps no listener (not even its default one)
            assert mon._client._listeners == []
            with pytest.raises(MonitorError, match="closed"):
                await waiter.wait(timeout=1)


@pytest.mark.asyncio
async def test_waiter_keeps_unmatched_events_and_times_out() -> None:
    async with asyncio.timeout(20):
        async with (
            FakeQMPServer() as server,
            await Monitor.connect(server.path) as mon,
            mon.listen() as waiter,
        ):
            await server.emit("A", {"n": 1})
            await server.emit("B", {"n": 2})
            await server.emit("A", {"n": 3})
            event = await waiter.wait(predicate=lambda e: e["data"]["n"] == 3, timeout=1)
            assert event["data"] == {"n": 3}
            assert (await waiter.wait("B", timeout=1))["data"] == {"n": 2}
            started = time.monotonic()
            with pytest.raises(OperationTimeout, match="B event"):
                await waiter.wait("B", timeout=0.1)
            assert time.monotonic() - started < 0.5
            assert [e["data"]["n"] for e in waiter.drain()] == [1]


@pytest.mark.asyncio
async def test_waiter_wakes_up_when_qemu_hangs_up() -> None:
    async with asyncio.timeout(20):
        async with (
            FakeQMPServer() as server,
            await Monitor.connect(server.path) as mon,
            mon.listen("JOB_STATUS_CHANGE") as waiter,
        ):
            asyncio.get_running_loop().call_later(0.05, server.hang_up)
            started = time.monotonic()
            with pytest.raises(MonitorError, match="QEMU closed the QMP connection"):
                await waiter.wait(timeout=5)
            assert time.monotonic() - started < 1


# --- jobs -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_job_success_is_dismissed() -> None:
    async with asyncio.timeout(20):
        jobs = FakeJobs()
        script = jobs.script(**{"snapshot-save": jobs.snapshot_job()})
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            args = {"tag": "s1", "vmstate": "vda-fmt", "devices": ["vda-fmt"]}
            await mon.run_job("snapshot-save", args, job_id="save-1", timeout=5)
            assert server.args("snapshot-save") == [{**args, "job-id": "save-1"}]
            assert server.args("job-dismiss") == [{"id": "save-1"}]
            assert jobs.jobs == {}


@pytest.mark.asyncio
async def test_job_concluded_with_error_raises_job_error_and_is_dismissed() -> None:
    async with asyncio.timeout(20):
        jobs = FakeJobs()
        error = "Snapshot 's1' already exists in one or more devices"
        script = jobs.script(**{"snapshot-save": jobs.snapshot_job(error)})
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            with pytest.raises(JobError, match="already exists"):
                await mon.run_job("snapshot-save", {"tag": "s1"}, job_id="j", timeout=5)
            assert server.args("job-dismiss") == [{"id": "j"}]
            assert "job-cancel" not in server.names
            assert jobs.jobs == {}


@pytest.mark.asyncio
async def test_job_refused_is_not_cancelled() -> None:
    async with asyncio.timeout(20):
        jobs = FakeJobs()
        jobs.jobs["j"] = {"status": "running"}  # someone else's job with the same id
        script = jobs.script(
            **{"snapshot-save": Error("GenericError", "Job ID 'j' already in use")}
        )
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            with pytest.raises(CommandError, match="already in use"):
                await mon.run_job("snapshot-save", {"tag": "s1"}, job_id="j", timeout=5)
            assert "job-cancel" not in server.names
            assert "job-dismiss" not in server.names


@pytest.mark.asyncio
async def test_job_timeout_cancels_and_dismisses() -> None:
    async with asyncio.timeout(20):
        jobs = FakeJobs()
        script = jobs.script(**{"snapshot-save": jobs.snapshot_job(finish=False)})
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            started = time.monotonic()
            with pytest.raises(OperationTimeout, match="snapshot-save job 'j'"):
                await mon.run_job("snapshot-save", {"tag": "s1"}, job_id="j", timeout=0.2)
            assert time.monotonic() - started < 2
            assert server.args("job-cancel") == [{"id": "j"}]
            assert server.args("job-dismiss") == [{"id": "j"}]
            assert jobs.jobs == {}


@pytest.mark.asyncio
async def test_job_cancellation_cancels_and_dismisses() -> None:
    async with asyncio.timeout(20):
        jobs = FakeJobs()
        script = jobs.script(**{"snapshot-load": jobs.snapshot_job(finish=False)})
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            task = asyncio.create_task(
                mon.run_job("snapshot-load", {"tag": "s1"}, job_id="j", timeout=30)
            )
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert server.args("job-cancel") == [{"id": "j"}]
            assert server.args("job-dismiss") == [{"id": "j"}]


def block_commit(jobs: FakeJobs, *, ready: bool = True, error: str | None = None) -> Any:
    """block-commit (active when ``ready``) that finishes after job-complete."""

    def finish_events(jid: str, auto_dismiss: bool) -> tuple[tuple[str, dict[str, Any]], ...]:
        done: dict[str, Any] = {"device": jid, "len": 100, "offset": 100, "speed": 0}
        if error:
            done["error"] = error
        events = status_event(jid, "waiting", "pending")
        events += (("BLOCK_JOB_COMPLETED", {"type": "commit", **done}),)
        events += status_event(jid, "concluded", *(["null"] if auto_dismiss else []))
        jobs.jobs[jid] = {"status": "concluded", **({"error": error} if error else {})}
        if auto_dismiss:
            del jobs.jobs[jid]
        return events

    def start(server: FakeQMPServer, args: dict[str, Any]) -> Reply:
        jid = args["job-id"]
        auto_dismiss = args.get("auto-dismiss", True)
        jobs.jobs[jid] = {"status": "running", "auto-dismiss": auto_dismiss}
        events = status_event(jid, "created", "running")
        if ready:
            events += status_event(jid, "ready")
            data = {"device": jid, "len": 100, "offset": 100, "speed": 0, "type": "commit"}
            events += (("BLOCK_JOB_READY", data),)
        else:
            events += finish_events(jid, auto_dismiss)
        return Reply({}, after=events, after_delay=0.01)

    def complete(server: FakeQMPServer, args: dict[str, Any]) -> Reply:
        jid = args["id"]
        return Reply({}, after=finish_events(jid, jobs.jobs[jid]["auto-dismiss"]))

    return {"block-commit": start, "block-stream": start, "job-complete": complete}


@pytest.mark.asyncio
async def test_block_job_ready_then_completed() -> None:
    async with asyncio.timeout(20):
        jobs = FakeJobs()
        script = jobs.script(**block_commit(jobs))
        seen: list[tuple[int, int]] = []
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            await mon.run_block_job(
                "block-commit",
                {"device": "overlay-1"},
                job_id="commit-1",
                timeout=5,
                progress=lambda done, total: seen.append((done, total)),
            )
            assert server.args("job-complete") == [{"id": "commit-1"}]
            assert server.args("block-commit") == [{"device": "overlay-1", "job-id": "commit-1"}]
            assert "block-job-cancel" not in server.names
            assert seen[-1] == (100, 100)


@pytest.mark.asyncio
async def test_block_job_completed_with_error() -> None:
    async with asyncio.timeout(20):
        jobs = FakeJobs()
        script = jobs.script(**block_commit(jobs, ready=False, error="No space left on device"))
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            with pytest.raises(JobError, match="No space left on device"):
                await mon.run_block_job("block-stream", {"device": "vda"}, job_id="s", timeout=5)
            assert "job-complete" not in server.names


@pytest.mark.asyncio
async def test_block_job_manual_dismiss() -> None:
    async with asyncio.timeout(20):
        jobs = FakeJobs()
        script = jobs.script(**block_commit(jobs))
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            args = {"device": "top", "auto-dismiss": False}
            await mon.run_block_job("block-commit", args, job_id="c", timeout=5)
            assert server.names[-1] == "job-dismiss"
            assert jobs.jobs == {}


@pytest.mark.asyncio
async def test_block_job_timeout_cancels() -> None:
    async with asyncio.timeout(20):
        jobs = FakeJobs()
        script = jobs.script(**block_commit(jobs))
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            with pytest.raises(OperationTimeout):
                await mon.run_block_job(
                    "block-commit", {"device": "top"}, job_id="c", timeout=0.2,
                    complete_on_ready=False,
                )  # fmt: skip
            assert server.args("block-job-cancel") == [{"device": "c", "force": True}]
            assert "job-complete" not in server.names


# --- fd passing -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_send_fd_passes_the_descriptor() -> None:
    async with asyncio.timeout(20):
        async with FakeQMPServer() as server, await Monitor.connect(server.path) as mon:
            with tempfile.TemporaryFile() as one, tempfile.TemporaryFile() as two:
                await asyncio.gather(
                    mon.send_fd(one.fileno(), "mem-1"), mon.send_fd(two.fileno(), "mem-2")
                )
                assert os.fstat(server.fds["mem-1"]).st_ino == os.fstat(one.fileno()).st_ino
                assert os.fstat(server.fds["mem-2"]).st_ino == os.fstat(two.fileno()).st_ino
                await mon.close_fd("mem-1")
            assert "mem-1" not in server.fds


@pytest.mark.asyncio
async def test_send_fd_refused_without_scm_rights_is_command_error() -> None:
    async with asyncio.timeout(20):
        async with FakeQMPServer() as server, await Monitor.connect(server.path) as mon:
            with pytest.raises(CommandError, match="SCM_RIGHTS"):
                await mon.execute("getfd", {"fdname": "x"})


# --- typed helpers ----------------------------------------------------------------------------

QUERY_BLOCK = [
    {  # -blockdev ... -device virtio-blk-pci,drive=vda-fmt,id=vda
        "device": "",
        "qdev": "/machine/peripheral/vda/virtio-backend",
        "inserted": {
            "file": "/vm/vda.qcow2",
            "node-name": "vda-fmt",
            "drv": "qcow2",
            "ro": False,
            "image": {"filename": "/vm/vda.qcow2", "format": "qcow2"},
        },
    },
    {  # scsi-hd,id=data: the device itself is the block backend's parent
        "device": "",
        "qdev": "/machine/peripheral/data",
        "inserted": {
            "file": "/vm/data.raw",
            "node-name": "data-fmt",
            "drv": "raw",
            "ro": True,
            "image": {"filename": "/vm/data.raw", "format": "raw"},
        },
    },
    {  # -drive if=none,id=drive0 + a device without id
        "device": "drive0",
        "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
        "inserted": {
            "file": "/vm/d0.qcow2",
            "node-name": "#block123",
            "drv": "qcow2",
            "ro": False,
            "image": {"filename": "/vm/d0.qcow2", "format": "qcow2"},
        },
    },
    {  # no device name, anonymous device: the node name
        "device": "",
        "qdev": "/machine/peripheral-anon/device[1]/virtio-backend",
        "inserted": {
            "file": 'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/vm/n.qcow2"}}',  # noqa: E501
            "node-name": "node-n",
            "drv": "qcow2",
            "ro": False,
            "image": {
                "filename": 'json:{"driver": "qcow2", "file": {"driver": "file", "filename": "/vm/n.qcow2"}}',  # noqa: E501
                "format": "qcow2",
            },
        },
    },
    {"device": "ide1-cd0", "qdev": "/machine/unattached/device[23]", "removable": True},
    {  # an older QEMU's qdev: the bare id
        "device": "",
        "qdev": "sata0",
        "inserted": {
            "file": "/vm/s.qcow2",
            "node-name": "s-fmt",
            "drv": "qcow2",
            "ro": False,
            "image": {"filename": "/vm/s.qcow2", "format": "qcow2"},
        },
    },
]


@pytest.mark.asyncio
async def test_disks_naming_rules() -> None:
    async with asyncio.timeout(20):
        async with (
            FakeQMPServer({"query-block": QUERY_BLOCK}) as server,
            await Monitor.connect(server.path) as mon,
        ):
            disks = await mon.disks()
        assert [d.name for d in disks] == ["vda", "data", "drive0", "node-n", "sata0"]
        assert disks[0] == Disk(
            name="vda",
            file="/vm/vda.qcow2",
            format="qcow2",
            node_name="vda-fmt",
            device="/machine/peripheral/vda/virtio-backend",
            read_only=False,
        )
        assert disks[1].read_only and disks[1].format == "raw"
        assert disks[3].file == "/vm/n.qcow2"


@pytest.mark.asyncio
async def test_qemu_io_resolves_device_id_and_reports_errors() -> None:
    def hmp(server: FakeQMPServer, args: dict[str, Any]) -> str:
        line = args["command-line"]
        if "nosuch" in line:
            return "Error: Device 'nosuch' not found\r\n"
        return ""

    async with asyncio.timeout(20):
        script = {"query-block": QUERY_BLOCK, "human-monitor-command": hmp}
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            assert await mon.qemu_io("vda", 'write -P 0x11 0 1M "x"') == ""
            line = server.args("human-monitor-command")[0]["command-line"]
            assert line == (
                'qemu-io -d /machine/peripheral/vda/virtio-backend "write -P 0x11 0 1M \\"x\\""'
            )
            with pytest.raises(MonitorError, match="Device 'nosuch' not found"):
                await mon.qemu_io("nosuch", "read 0 1M")


@pytest.mark.asyncio
async def test_wait_status_not_polls_until_state_changes() -> None:
    states = iter(["finish-migrate", "finish-migrate", "postmigrate"])

    def status(server: FakeQMPServer, args: dict[str, Any]) -> Any:
        state = next(states, None)
        if state is None:
            return Reply(no_reply=True)  # later polls hang: the deadline must still hold
        return {"status": state, "running": False}

    async with asyncio.timeout(20):
        async with (
            FakeQMPServer({"query-status": status}) as server,
            await Monitor.connect(server.path) as mon,
        ):
            current = await mon.wait_status_not("finish-migrate", 5)
            assert current == RunStatus("postmigrate", False)
            assert server.names.count("query-status") == 3
            with pytest.raises(OperationTimeout, match="leaving run state 'paused'"):
                await mon.wait_status_not("paused", 0.1)


@pytest.mark.asyncio
async def test_quit_tolerates_the_disconnect() -> None:
    async with asyncio.timeout(20):
        async with FakeQMPServer({"quit": Reply(hang_up=True)}) as server:
            mon = await Monitor.connect(server.path)
            await mon.quit()
            assert not mon.connected
            assert server.names[-1] == "quit"


@pytest.mark.asyncio
async def test_stop_cont_and_queries() -> None:
    async with asyncio.timeout(20):
        script = {
            "stop": {},
            "cont": {},
            "query-migrate": {"status": "completed"},
            "query-named-block-nodes": [{"node-name": "a"}],
            "human-monitor-command": "info\r\n",
        }
        async with FakeQMPServer(script) as server, await Monitor.connect(server.path) as mon:
            await mon.stop()
            await mon.cont()
            assert await mon.query_migrate() == {"status": "completed"}
            assert await mon.query_named_block_nodes() == [{"node-name": "a"}]
            assert server.args("query-named-block-nodes") == [{"flat": True}]
            assert await mon.human_monitor_command("info status") == "info\r\n"


# --- connecting -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_not_a_qmp_server() -> None:
    async with asyncio.timeout(20):
        async with FakeQMPServer(greeting=b"SSH-2.0-OpenSSH_9.2\r\n") as server:
            with pytest.raises(MonitorConnectError, match="not a QMP server"):
                await Monitor.connect(server.path)


@pytest.mark.asyncio
async def test_wrong_json_greeting() -> None:
    async with asyncio.timeout(20):
        async with FakeQMPServer(greeting={"hello": "world"}) as server:
            with pytest.raises(MonitorConnectError, match="not a QMP server"):
                await Monitor.connect(server.path)


@pytest.mark.asyncio
async def test_silent_server_times_out_as_connect_error() -> None:
    async with asyncio.timeout(20):
        directory = short_tempdir()
        path = os.path.join(directory, "s")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(1)
            started = time.monotonic()
            with pytest.raises(MonitorConnectError, match="no QMP greeting"):
                await Monitor.connect(path, timeout=0.2)
            assert time.monotonic() - started < 1
        finally:
            listener.close()
            os.unlink(path)
            os.rmdir(directory)


@pytest.mark.asyncio
async def test_nothing_listening() -> None:
    async with asyncio.timeout(20):
        directory = short_tempdir()
        try:
            with pytest.raises(MonitorConnectError, match="No such file"):
                await Monitor.connect(os.path.join(directory, "absent.sock"))
            stale = os.path.join(directory, "stale.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(stale)
            sock.close()  # a socket file nobody listens on: ECONNREFUSED
            with pytest.raises(MonitorConnectError, match="refused"):
                await Monitor.connect(stale)
        finally:
            for name in os.listdir(directory):
                os.unlink(os.path.join(directory, name))
            os.rmdir(directory)


@pytest.mark.asyncio
async def test_connect_over_socketpair() -> None:
    async with asyncio.timeout(20):
        ours, theirs = socket.socketpair()
        async with FakeQMPServer({"query-status": {"status": "paused", "running": False}}) as srv:
            srv.attach(theirs)
            async with await Monitor.connect(ours, name="vm1") as mon:
                assert (await mon.query_status()).status == "paused"
                # SO_PEERCRED of a socketpair names its creator (us), not QEMU
                assert mon.peer_pid() is None
            assert ours.fileno() == -1  # the Monitor owned and closed it


PEER_SERVER = textwrap.dedent(
    """
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(sys.argv[1]); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept()
    c.sendall(json.dumps({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
              "package": ""}, "capabilities": []}}).encode() + b"\\n")
    f = c.makefile("rb")
    buf = b""
    while True:
        chunk = c.recv(4096)
        if not chunk:
            break
        buf += chunk
        try:
            msg = json.loads(buf)
        except ValueError:
            continue
        buf = b""
        c.sendall(json.dumps({"return": {}, "id": msg.get("id")}).encode() + b"\\n")
    """
)


@pytest.mark.asyncio
async def test_peer_credentials_of_a_path_connection() -> None:
    directory = short_tempdir()
    path = os.path.join(directory, "qmp.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", PEER_SERVER, path], stdout=subprocess.PIPE, text=True
    )

    async def main() -> None:
        async with await Monitor.connect(path) as mon:
            assert mon.peer_pid() == proc.pid
            assert mon.peer_uid() == os.getuid()
            assert await mon.execute("query-status") == {}

    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        async with asyncio.timeout(20):
            await main()
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        os.unlink(path)
        os.rmdir(directory)
