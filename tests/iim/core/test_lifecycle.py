"""The lifecycle shape every long-lived part shares: ``async with`` starts, ``aclose`` stops, failures unwind."""

from __future__ import annotations

import asyncio
import logging

import pytest

from iim.core.lifecycle import AsyncResource, TaskSupervisor


class _Listener(AsyncResource):
    """A part that opens a server socket and then fails (or not) to finish starting."""

    def __init__(self, fail_after_listening: bool) -> None:
        self.fail_after_listening = fail_after_listening
        self.server: asyncio.Server | None = None
        self.closes = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        if self.fail_after_listening:
            raise ValueError("bad configuration found after listening")

    async def aclose(self) -> None:
        self.closes += 1
        server, self.server = self.server, None
        if server is not None:
            server.close()
            await server.wait_closed()


async def test_a_part_whose_start_fails_is_closed_before_the_error_reaches_the_caller() -> None:
    part = _Listener(fail_after_listening=True)
    leaked = None
    try:
        with pytest.raises(ValueError, match="after listening"):
            async with part:
                pytest.fail("the body must not run")
        leaked = part.server
        assert leaked is None
        assert part.closes == 1
    finally:
        if leaked is not None:  # keep a failure of this test from hanging the loop's teardown
            leaked.close()


async def test_leaving_the_block_closes_the_part_once_even_when_the_body_fails() -> None:
    part = _Listener(fail_after_listening=False)
    seen: list[asyncio.Server | None] = []

    async def body() -> None:
        async with part as entered:
            seen.append(entered.server)
            raise KeyError("body failed")

    with pytest.raises(KeyError):
        await body()
    assert seen[0] is not None  # it was listening inside the block
    assert part.server is None
    assert part.closes == 1


async def test_the_supervisor_cancels_and_awaits_every_task_on_aclose() -> None:
    before = asyncio.all_tasks()
    async with TaskSupervisor() as tasks:
        forever = tasks.spawn(asyncio.sleep(3600), name="forever")
        await asyncio.sleep(0)
    assert forever.cancelled()
    assert asyncio.all_tasks() == before


async def test_a_supervised_task_that_dies_is_logged_at_once(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("boom")

    async with TaskSupervisor() as tasks:
        task = tasks.spawn(broken(), name="broken-watch")
        with caplog.at_level(logging.ERROR, logger="iim.lifecycle"):
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0)  # done callbacks run on the next loop iteration
    assert [r.getMessage() for r in caplog.records] == ["background task broken-watch died"]


async def test_a_supervised_task_that_dies_is_started_again_and_stops_with_its_owner() -> None:
    runs: list[int] = []
    running = asyncio.Event()

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise ConnectionResetError("the server went away")
        running.set()
        await asyncio.Event().wait()

    supervisor = TaskSupervisor()
    async with supervisor:
        supervisor.supervise(flaky, name="flaky", initial=0.01, ceiling=0.02)
        await asyncio.wait_for(running.wait(), 5)
    assert runs == [0, 1, 2]
    assert not supervisor._tasks  # cancelled and awaited with its owner


async def test_a_supervised_task_ending_while_its_owner_stops_is_not_started_again() -> None:
    runs: list[int] = []
    stopping = False

    async def once() -> None:
        runs.append(1)

    supervisor = TaskSupervisor()
    task = supervisor.supervise(once, name="once", initial=0.01, until=lambda: stopping)
    await asyncio.sleep(0.05)
    assert len(runs) >= 2  # ended on its own: started again
    stopping = True
    await asyncio.wait_for(task, 1)  # ends quietly once the owner says it stops
    await supervisor.aclose()


async def test_a_task_that_swallows_its_cancellation_does_not_hang_the_stop(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Python 3.11's wait_for can lose a cancel that races its inner future; the loop then waits on again.
    monkeypatch.setattr(TaskSupervisor, "CLOSE_DEADLINE_S", 0.2)
    forever = asyncio.Event()

    async def stubborn() -> None:
        while not forever.is_set():
            try:
                await forever.wait()
            except asyncio.CancelledError:
                continue

    tasks = TaskSupervisor()
    await tasks.start()
    task = tasks.spawn(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    started = asyncio.get_running_loop().time()
    await tasks.aclose()
    assert asyncio.get_running_loop().time() - started < 3.0
    assert "stubborn did not stop when cancelled" in caplog.text
    forever.set()  # let it end, so the test leaves nothing running
    await asyncio.wait_for(task, 1.0)
