"""Process-level helpers: the event loop runner and garbage-collector tuning."""

from __future__ import annotations

import asyncio
import gc

from retire_cluster.runtime import GC_GEN0_THRESHOLD, run, tune_gc


def test_tune_gc_freezes_startup_state_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    startup_state = [{"task": n} for n in range(1000)]
    try:
        tune_gc()
        assert gc.get_threshold() == (GC_GEN0_THRESHOLD, before[1], before[2])
        assert gc.get_freeze_count() >= len(startup_state)
        assert all(not gc.is_finalized(obj) for obj in startup_state)
        cycle: list[object] = []
        cycle.append(cycle)  # cyclic garbage is still collected, only less often
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_run_returns_the_coroutines_result_on_either_loop() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert run(answer()) == 42
    assert run(answer(), fast_loop=False) == 42


def test_debug_logging_is_ours_not_every_sql_statement() -> None:
    """--log-level debug used to make aiosqlite log each statement it ran, flooding stderr and the log file."""
    import logging

    from retire_cluster.runtime import setup_logging, stop_logging

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), logging.getLogger("aiosqlite").level)
    try:
        setup_logging("debug")
        assert logging.getLogger("retire_cluster.main").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("aiosqlite").isEnabledFor(logging.DEBUG)
        setup_logging("warning")  # a quieter level stays quieter for them too
        assert not logging.getLogger("aiosqlite").isEnabledFor(logging.INFO)
    finally:
        stop_logging()
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        logging.getLogger("aiosqlite").setLevel(saved[2])
