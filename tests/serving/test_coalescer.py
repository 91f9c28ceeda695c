"""latentforge.serving.batching.Coalescer: the batches that wait behind a running call go together into the next one."""

import asyncio
import threading

import pytest

from latentforge.serving.batching import Coalescer


def test_items_waiting_behind_a_running_call_are_merged_up_to_max_items():
    calls: list[list[int]] = []
    release = threading.Event()

    def fn(items):
        calls.append(list(items))
        if len(calls) == 1:
            release.wait(5)  # hold the first call while more items arrive
        return [i * 10 for i in items]

    async def main():
        c = Coalescer(fn, max_items=4)
        first = c.submit([1])
        await asyncio.sleep(0.05)  # the first call is running now
        later = [c.submit([i]) for i in range(2, 8)]  # six single-item batches, as serve.batch forms them
        release.set()
        results = await asyncio.gather(*first, *(f for fs in later for f in fs))
        return results

    results = asyncio.run(main())
    assert results == [10, 20, 30, 40, 50, 60, 70]  # each caller gets its own result, in order
    assert calls == [[1], [2, 3, 4, 5], [6, 7]]


def test_an_error_reaches_every_caller_of_that_call_and_the_next_call_still_runs():
    def fn(items):
        if "bad" in items:
            raise ValueError("bad input")
        return [s.upper() for s in items]

    async def main():
        c = Coalescer(fn, max_items=8)
        failing = c.submit(["ok", "bad"])
        with pytest.raises(ValueError, match="bad input"):
            await failing[0]
        with pytest.raises(ValueError, match="bad input"):
            await failing[1]
        return await asyncio.gather(*c.submit(["fine"]))

    assert asyncio.run(main()) == ["FINE"]


def test_max_items_one_runs_items_one_at_a_time():
    calls: list[list[int]] = []

    def fn(items):
        calls.append(list(items))
        return items

    async def main():
        c = Coalescer(fn, max_items=1)
        return await asyncio.gather(*c.submit([1, 2, 3]))

    assert asyncio.run(main()) == [1, 2, 3]
    assert calls == [[1], [2], [3]]


def test_a_cancelled_caller_does_not_break_the_others():
    release = threading.Event()

    def fn(items):
        release.wait(5)
        return items

    async def main():
        c = Coalescer(fn, max_items=4)
        a, b = c.submit(["a", "b"])
        a.cancel()
        release.set()
        return await b

    assert asyncio.run(main()) == "b"


def test_under_load_a_call_lingers_for_more_items_but_an_idle_one_runs_at_once():
    calls: list[list[int]] = []

    def fn(items):
        calls.append(list(items))
        return items

    async def main():
        c = Coalescer(fn, max_items=8, linger_s=0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await c.submit([1])[0] == 1  # idle: no linger
        idle_seconds = loop.time() - t0
        await asyncio.gather(*c.submit([2, 3]))  # a call of 2: the replica is under load now
        first = c.submit([4])
        await asyncio.sleep(0.05)  # arrives while the next call lingers
        second = c.submit([5])
        await asyncio.gather(first[0], second[0])
        return idle_seconds

    idle_seconds = asyncio.run(main())
    assert idle_seconds < 0.1
    assert calls == [[1], [2, 3], [4, 5]]
