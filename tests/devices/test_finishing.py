"""``FinishTurns``: at most ``depth`` finishes at once, a ``first`` one ahead of the others."""

from __future__ import annotations

import asyncio

import pytest

from smartmeter_ophyd.devices._finishing import FinishTurns, finish_turns


async def _hold(turns: FinishTurns, name: str, first: bool, order: list[str],
                release: asyncio.Event) -> None:
    async with turns.turn(first=first):
        order.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_a_first_finish_goes_ahead_of_those_waiting_and_the_rest_keep_their_order() -> None:
    async def main() -> list[str]:
        turns, order = FinishTurns(depth=1), []
        releases = {name: asyncio.Event() for name in "abcde"}
        tasks = []
        for name, first in (("a", False), ("b", False), ("c", False), ("d", True), ("e", False)):
            tasks.append(asyncio.create_task(_hold(turns, name, first, order, releases[name])))
            await _settle()
        assert (turns.active, turns.waiting) == (1, 4)
        for name in "adbce":  # each holder, in the order it got its turn, lets go
            releases[name].set()
            await _settle()
        await asyncio.gather(*tasks)
        assert (turns.active, turns.waiting) == (0, 0)
        return order

    assert asyncio.run(main()) == ["a", "d", "b", "c", "e"]


def test_no_more_than_depth_finishes_hold_a_turn() -> None:
    async def main() -> int:
        turns, most = FinishTurns(depth=2), 0

        async def finish() -> None:
            nonlocal most
            async with turns.turn():
                most = max(most, turns.active)
                await asyncio.sleep(0.001)

        await asyncio.gather(*(finish() for _ in range(8)))
        return most

    assert asyncio.run(main()) == 2


def test_a_cancelled_wait_gives_up_its_place_and_a_granted_one_passes_its_turn_on() -> None:
    async def main() -> list[str]:
        turns, order = FinishTurns(depth=1), []
        releases = {name: asyncio.Event() for name in "bcd"}
        tasks = {}
        async with turns.turn():
            for name in "bcd":
                tasks[name] = asyncio.create_task(
                    _hold(turns, name, False, order, releases[name]))
                await _settle()
            tasks["b"].cancel()  # still waiting: leaves the queue
            await _settle()
            assert turns.waiting == 2
        # leaving the turn granted it to c; c is cancelled before it could run, so the
        # turn passes on to d
        tasks["c"].cancel()
        await _settle()
        releases["d"].set()
        done, _ = await asyncio.wait(tasks.values(), timeout=5.0)
        assert len(done) == 3, "d never got the turn c was granted"
        results = [t.exception() if not t.cancelled() else asyncio.CancelledError()
                   for t in tasks.values()]
        assert [type(r).__name__ for r in results] == [
            "CancelledError", "CancelledError", "NoneType"]
        assert (turns.active, turns.waiting) == (0, 0)
        return order

    assert asyncio.run(main()) == ["d"]


def test_one_set_of_turns_per_loop() -> None:
    async def current() -> FinishTurns:
        return finish_turns(asyncio.get_running_loop())

    async def twice() -> tuple[FinishTurns, FinishTurns]:
        return await current(), await current()

    first, again = asyncio.run(twice())
    assert first is again
    assert asyncio.run(current()) is not first
    with pytest.raises(ValueError, match="depth must be at least 1"):
        FinishTurns(depth=0)
