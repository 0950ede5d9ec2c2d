"""GuestAgent and frozen() against a fake qemu-guest-agent."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any

import pytest
from fake_qmp import Error, FakeGuestAgent, Reply, short_tempdir

from qemusnap.agent import ExecResult, GuestAgent, frozen
from qemusnap.errors import GuestAgentError, OperationTimeout

# What an earlier client that timed out can leave in the stream: a late reply, a reply to an
# older sync (with its own sentinel), and half a message.
STALE = b'{"return": 2}\n\xff{"return": 42}\n{"return": {"pid": 7}}\n{"retu'


@pytest.mark.asyncio
async def test_sync_delimited_discards_stale_input() -> None:
    async with asyncio.timeout(20):
        async with FakeGuestAgent(stale=STALE) as fake, await GuestAgent.connect(fake.path) as ga:
            assert fake.names == ["guest-sync-delimited"]
            sync_id = fake.commands[0]["arguments"]["id"]
            assert isinstance(sync_id, int) and sync_id != 42
            await ga.ping()
            assert await ga.fsfreeze_status() == "thawed"
            assert fake.names == ["guest-sync-delimited", "guest-ping", "guest-fsfreeze-status"]


@pytest.mark.asyncio
async def test_sync_ids_are_random() -> None:
    async with asyncio.timeout(20):
        async with FakeGuestAgent() as fake:
            for _ in range(3):
                async with GuestAgent(fake.path):
                    pass
            ids = {c["arguments"]["id"] for c in fake.commands}
            assert len(ids) == 3


@pytest.mark.asyncio
async def test_freeze_thaw_helpers_and_errors() -> None:
    async with asyncio.timeout(20):
        async with FakeGuestAgent() as fake, GuestAgent(fake.path) as ga:
            assert await ga.fsfreeze_freeze() == 2
            assert await ga.fsfreeze_status() == "frozen"
            with pytest.raises(GuestAgentError, match="has been disabled"):
                await ga.fsfreeze_freeze()
            assert await ga.fsfreeze_thaw() == 2
            assert await ga.fsfreeze_thaw() == 0
            with pytest.raises(GuestAgentError, match="CommandNotFound"):
                await ga.execute("guest-no-such")
            await ga.ping()  # an error reply leaves the connection usable
            assert fake.connections == 1


@pytest.mark.asyncio
async def test_exec_polls_and_decodes_output() -> None:
    async with asyncio.timeout(20):
        async with FakeGuestAgent() as fake, GuestAgent(fake.path) as ga:
            fake.exec_polls = 3
            fake.exec_results["/bin/cat"] = {
                "exitcode": 1,
                "out-data": base64.b64encode(b"hello\n").decode(),
                "err-data": base64.b64encode(b"oops").decode(),
            }
            fake.exec_results["/bin/kill-me"] = {"signal": 9}
            result = await ga.exec("/bin/cat", ["/etc/hostname"], timeout=5)
            assert result == ExecResult(exitcode=1, stdout=b"hello\n", stderr=b"oops")
            assert fake.names.count("guest-exec-status") == 4
            exec_args = [c["arguments"] for c in fake.commands if c["execute"] == "guest-exec"]
            assert exec_args[0] == {
                "path": "/bin/cat",
                "arg": ["/etc/hostname"],
                "capture-output": True,
            }
            assert (await ga.exec("/bin/kill-me", timeout=5)).exitcode == -9


@pytest.mark.asyncio
async def test_timed_out_command_drops_the_connection_and_reconnects() -> None:
    async with asyncio.timeout(20):
        calls = 0

        def slow_once(fake: FakeGuestAgent, args: dict[str, Any]) -> Any:
            nonlocal calls
            calls += 1
            return Reply({}, delay=0.5) if calls == 1 else {}

        async with (
            FakeGuestAgent({"guest-ping": slow_once}) as fake,
            GuestAgent(fake.path) as ga,
        ):
            started = time.monotonic()
            with pytest.raises(OperationTimeout) as info:
                await ga.ping(timeout=0.1)
            assert isinstance(info.value, TimeoutError)
            assert time.monotonic() - started < 0.4
            assert not ga.connected
            # the late {} of the first ping is never mistaken for this ping's reply
            await ga.ping()
            assert fake.connections == 2
            assert fake.names.count("guest-sync-delimited") == 2


@pytest.mark.asyncio
async def test_cancelled_command_drops_the_connection() -> None:
    async with asyncio.timeout(20):
        async with (
            FakeGuestAgent({"guest-ping": Reply(no_reply=True)}) as fake,
            GuestAgent(fake.path) as ga,
        ):
            task = asyncio.create_task(ga.ping())
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not ga.connected
            assert await ga.fsfreeze_status() == "thawed"


@pytest.mark.asyncio
async def test_closed_agent_raises_clearly() -> None:
    async with asyncio.timeout(20):
        async with FakeGuestAgent() as fake:
            ga = await GuestAgent.connect(fake.path)
            await ga.close()
            with pytest.raises(GuestAgentError, match="closed"):
                await ga.ping()


@pytest.mark.asyncio
async def test_agent_that_never_answers_times_out_on_connect() -> None:
    async with asyncio.timeout(20):
        async with FakeGuestAgent(sync=False) as fake:
            started = time.monotonic()
            with pytest.raises(OperationTimeout, match="guest agent"):
                await GuestAgent.connect(fake.path, timeout=0.2)
            assert time.monotonic() - started < 1


@pytest.mark.asyncio
async def test_no_agent_socket() -> None:
    async with asyncio.timeout(20):
        directory = short_tempdir()
        try:
            with pytest.raises(GuestAgentError, match="No such file"):
                await GuestAgent.connect(os.path.join(directory, "qga.sock"))
        finally:
            os.rmdir(directory)


@pytest.mark.asyncio
async def test_agent_hangs_up_during_command() -> None:
    async with asyncio.timeout(20):

        async def hang_up(fake: FakeGuestAgent, args: dict[str, Any]) -> Any:
            for writer in list(fake._writers):
                writer.close()
            return Reply(no_reply=True)

        async with FakeGuestAgent({"guest-ping": hang_up}) as fake, GuestAgent(fake.path) as ga:
            with pytest.raises(GuestAgentError, match="closed the connection during guest-ping"):
                await ga.ping()


# --- frozen() ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_frozen_freezes_and_thaws() -> None:
    async with asyncio.timeout(20):
        async with FakeGuestAgent() as fake, GuestAgent(fake.path) as ga:
            async with frozen(ga, timeout=5) as count:
                assert count == 2
                assert fake.frozen
            assert not fake.frozen
            assert fake.names[-2:] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]


@pytest.mark.asyncio
async def test_frozen_thaws_when_the_body_fails() -> None:
    async with asyncio.timeout(20):
        async with FakeGuestAgent() as fake, GuestAgent(fake.path) as ga:
            with pytest.raises(RuntimeError, match="snapshot failed"):
                async with frozen(ga, timeout=5):
                    raise RuntimeError("snapshot failed")
            assert not fake.frozen


@pytest.mark.asyncio
async def test_frozen_thaws_on_cancellation() -> None:
    async def thaw_slowly(fake: FakeGuestAgent) -> int:
        await asyncio.sleep(0.1)
        fake.frozen = False
        return 2

    async with asyncio.timeout(20):
        # a slow thaw must not be cut short by the cancellation that triggered it
        async with (
            FakeGuestAgent({"guest-fsfreeze-thaw": lambda fake, args: thaw_slowly(fake)}) as fake,
            GuestAgent(fake.path) as ga,
        ):
            entered = asyncio.Event()

            async def body() -> None:
                async with frozen(ga, timeout=5):
                    entered.set()
                    await asyncio.sleep(30)

            task = asyncio.create_task(body())
            await entered.wait()
            task.cancel()
            await asyncio.sleep(0.01)
            task.cancel()  # a second cancellation while the thaw runs
            with pytest.raises(asyncio.CancelledError):
                await task
            assert not fake.frozen
            assert fake.names[-1] == "guest-fsfreeze-thaw"


@pytest.mark.asyncio
async def test_frozen_thaws_after_a_freeze_that_timed_out() -> None:
    async with asyncio.timeout(20):
        # The agent is stuck in FIFREEZE: no answer. We give up, reconnect and thaw.
        async with (
            FakeGuestAgent({"guest-fsfreeze-freeze": Reply(no_reply=True)}) as fake,
            GuestAgent(fake.path) as ga,
        ):
            started = time.monotonic()
            with pytest.raises(OperationTimeout, match="guest-fsfreeze-freeze"):
                async with frozen(ga, timeout=0.2, thaw_timeout=1):
                    pytest.fail("the body must not run")
            assert time.monotonic() - started < 1
            assert fake.names[-1] == "guest-fsfreeze-thaw"
            assert fake.connections == 2


@pytest.mark.asyncio
async def test_frozen_freeze_error_still_thaws() -> None:
    async with asyncio.timeout(20):
        script = {"guest-fsfreeze-freeze": Error("GenericError", "failed to freeze /data")}
        async with FakeGuestAgent(script) as fake, GuestAgent(fake.path) as ga:
            with pytest.raises(GuestAgentError, match="failed to freeze"):
                async with frozen(ga, timeout=1):
                    pytest.fail("the body must not run")
            assert fake.names[-1] == "guest-fsfreeze-thaw"


@pytest.mark.asyncio
async def test_frozen_thaw_failure_after_success_is_an_error() -> None:
    async with asyncio.timeout(20):
        script = {"guest-fsfreeze-thaw": Error("GenericError", "thaw failed: EIO")}
        async with FakeGuestAgent(script) as fake, GuestAgent(fake.path) as ga:
            with pytest.raises(GuestAgentError, match="may still be frozen"):
                async with frozen(ga, timeout=1):
                    pass
            assert fake.frozen


@pytest.mark.asyncio
async def test_frozen_body_error_wins_over_thaw_failure() -> None:
    async with asyncio.timeout(20):
        script = {"guest-fsfreeze-thaw": Reply(no_reply=True)}
        async with FakeGuestAgent(script) as fake, GuestAgent(fake.path) as ga:
            with pytest.raises(RuntimeError) as info:
                async with frozen(ga, timeout=1, thaw_timeout=0.1):
                    raise RuntimeError("snapshot failed")
            assert any("may still be frozen" in note for note in info.value.__notes__)
            assert fake.names[-1] == "guest-fsfreeze-thaw"
