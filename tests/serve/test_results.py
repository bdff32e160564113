"""The hand-over of engine events to the asyncio loop (:mod:`lorakit.serve.jobs`)."""

from __future__ import annotations

import asyncio

from lorakit.serve.jobs import AsyncResults, Finished, Outbox, Sampled


def _wakeups_and_events(hold: bool) -> tuple[int, list]:
    """Three tokens then the end, flushed step by step as the engine does; how many times the reader woke."""

    async def main():
        results = AsyncResults()
        results.hold = hold
        wakeups, seen = 0, []

        async def reader():
            nonlocal wakeups
            while True:
                event = await results.queue.get()
                wakeups += 1
                seen.append(event)
                while not results.queue.empty():
                    seen.append(results.queue.get_nowait())
                if isinstance(seen[-1], Finished):
                    return

        task = asyncio.create_task(reader())
        for event in [Sampled(5), Sampled(6), Sampled(7), Finished("length")]:
            results.put(event)
            Outbox.flush_all()
            await asyncio.sleep(0.01)  # the loop runs the hand-over before the next step
        await asyncio.wait_for(task, 5)
        return wakeups, seen

    return asyncio.run(main())


def test_held_events_arrive_in_order_with_the_final_one():
    wakeups, seen = _wakeups_and_events(hold=True)
    assert [getattr(e, "token", None) for e in seen] == [5, 6, 7, None] and isinstance(seen[-1], Finished)
    assert wakeups == 1  # one wake-up for the whole answer, not one a token


def test_without_hold_every_step_wakes_the_reader():
    wakeups, seen = _wakeups_and_events(hold=False)
    assert [getattr(e, "token", None) for e in seen] == [5, 6, 7, None]
    assert wakeups == 4


def test_hold_set_midway_keeps_the_order_and_later_tokens_skip_the_loop():
    async def main():
        results = AsyncResults()
        results.put(Sampled(5))
        Outbox.flush_all()
        await asyncio.sleep(0.01)  # delivered before the reader held: in the queue
        results.put(Sampled(6))
        Outbox.flush_all()  # handed over, delivered after hold is set: held on the loop
        results.hold = True
        await asyncio.sleep(0.01)
        results.put(Sampled(7))  # the engine thread sees hold: kept there, nothing for the loop
        assert not results.outbox.pending
        results.put(Finished("length"))
        Outbox.flush_all()
        await asyncio.sleep(0.01)
        return [results.queue.get_nowait() for _ in range(results.queue.qsize())]

    seen = asyncio.run(main())
    assert [getattr(e, "token", None) for e in seen] == [5, 6, 7, None] and isinstance(seen[-1], Finished)
