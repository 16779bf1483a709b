"""The worker's queue shared between clients: jobs run in turn by client address, and one
client may hold at most half the queue (issue 20: sixty connections of one client that
never read their answers kept every other client's request behind all of theirs)."""

from __future__ import annotations

import asyncio
import time

import pytest

from anomalyclip.serving.settings import ServiceSettings
from anomalyclip.serving.worker import InferenceWorker, ServiceBusy


def test_jobs_of_two_clients_run_in_turn_not_first_come_first_served():
    worker = InferenceWorker(ServiceSettings(max_pending=32))
    order: list[str] = []

    def job(name: str) -> str:
        time.sleep(0.05)
        order.append(name)
        return name

    async def scenario() -> None:
        crowd = [worker.run(job, f"a{index}", client="10.0.0.2") for index in range(6)]
        first = [asyncio.ensure_future(coroutine) for coroutine in crowd]
        await asyncio.sleep(0.01)  # the crowd's six are queued first
        late = asyncio.ensure_future(worker.run(job, "b0", client="10.0.0.1"))
        await asyncio.gather(*first, late)

    asyncio.run(scenario())
    worker.shutdown()
    # a0 was running when b0 came; b0 goes next, not after a5 as in a plain queue
    assert order.index("b0") <= 2, order
    assert [name for name in order if name.startswith("a")] == [f"a{i}" for i in range(6)]


def test_one_client_holds_at_most_half_the_queue_others_still_get_in():
    worker = InferenceWorker(ServiceSettings(max_pending=8))

    async def scenario() -> tuple[list[str], str]:
        release = asyncio.Event()
        loop = asyncio.get_running_loop()

        def job(name: str) -> str:
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)
            return name

        crowd = [
            asyncio.ensure_future(worker.run(job, f"a{index}", client="10.0.0.2"))
            for index in range(4)
        ]
        await asyncio.sleep(0.05)
        with pytest.raises(ServiceBusy, match="this client already has 4 requests waiting"):
            await worker.run(job, "a4", client="10.0.0.2")
        other = asyncio.ensure_future(worker.run(job, "b0", client="10.0.0.1"))
        await asyncio.sleep(0.05)
        release.set()
        return [*await asyncio.gather(*crowd)], await other

    crowd, other = asyncio.run(scenario())
    worker.shutdown()
    assert crowd == ["a0", "a1", "a2", "a3"] and other == "b0"
    assert worker.pending == 0
