"""AsyncEngine: streams, cancellation that aborts, the abort call, duplicates, a dead loop, shutdown."""

from __future__ import annotations

import asyncio

import pytest
from engine_cases import PROMPTS

from moe_runtime.engine.async_engine import AsyncEngine
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.errors import EngineDeadError, RequestError

LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)


async def _collect(engine, rid, prompt, params):
    outs = []
    async for out in engine.generate(rid, prompt, params):
        outs.append(out)
    return outs


async def _wait_until(predicate, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_concurrent_streams_match_the_offline_engine(make_engine):
    offline = make_engine().generate(list(PROMPTS), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))

    async def main():
        engine = AsyncEngine(make_engine())
        await engine.start()
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)
        results = await asyncio.gather(*(_collect(engine, f"r{i}", p, params) for i, p in enumerate(PROMPTS)))
        await engine.shutdown()
        return results

    for outs, want in zip(asyncio.run(main()), offline, strict=True):
        assert [t for o in outs for t in o.new_token_ids] == want.token_ids
        assert "".join(o.new_text for o in outs) == want.text
        assert sum(len(o.logprobs) for o in outs) == 8
        last = outs[-1]
        assert last.finished and last.finish_reason == "length" and last.num_output_tokens == 8
        assert not any(o.finished for o in outs[:-1])
        m = last.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finish_time


def test_cancelling_the_consumer_aborts_and_frees_blocks(make_engine):
    llm = make_engine()

    async def main():
        engine = AsyncEngine(llm)
        await engine.start()
        task = asyncio.create_task(_collect(engine, "c", PROMPTS[2], LONG))
        await _wait_until(lambda: engine.make_stats().num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await _wait_until(lambda: engine.make_stats().kv_blocks_used == 0)
        # Breaking out of the loop aborts too.
        async for _ in engine.generate("b", PROMPTS[0], LONG):
            break
        await _wait_until(lambda: not llm.has_unfinished())
        # The id is free again.
        outs = await _collect(engine, "c", PROMPTS[0], SamplingParams(max_tokens=2, temperature=0))
        assert outs[-1].finished
        await engine.shutdown()

    asyncio.run(main())
    assert llm.scheduler.block_manager.num_used == 0


def test_abort_ends_the_stream_with_reason_abort(make_engine):
    async def main():
        engine = AsyncEngine(make_engine())
        await engine.start()
        task = asyncio.create_task(_collect(engine, "a", PROMPTS[1], LONG))
        await _wait_until(lambda: engine.make_stats().num_running == 1)
        await engine.abort("a")
        await engine.abort("unknown")
        outs = await task
        await engine.shutdown()
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"


def test_duplicate_ids_and_bad_params_raise_request_error(make_engine):
    async def main():
        engine = AsyncEngine(make_engine())
        await engine.start()
        task = asyncio.create_task(_collect(engine, "dup", PROMPTS[1], LONG))
        await _wait_until(lambda: engine.make_stats().num_running == 1)
        with pytest.raises(RequestError, match="already in flight"):
            await _collect(engine, "dup", PROMPTS[0], LONG)
        with pytest.raises(RequestError, match="^top_p"):
            await _collect(engine, "x", PROMPTS[0], SamplingParams(top_p=0))
        await engine.abort("dup")
        await task
        await engine.shutdown()

    asyncio.run(main())


def test_dead_loop_fails_every_stream(make_engine):
    llm = make_engine()
    real_execute = llm.executor.execute
    calls = []

    def failing_execute(sched):
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError("worker exploded")
        return real_execute(sched)

    llm.executor.execute = failing_execute

    async def main():
        engine = AsyncEngine(llm)
        await engine.start()
        results = await asyncio.gather(*(_collect(engine, f"r{i}", p, LONG) for i, p in enumerate(PROMPTS)),
                                       return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert engine.is_dead and "worker exploded" in str(engine.dead_error)
        with pytest.raises(EngineDeadError):
            await _collect(engine, "late", PROMPTS[0], LONG)
        await engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), timeout=60))
    for rid in list(llm.scheduler.requests):  # the dead engine still holds them: free for the leak check
        llm.abort(rid)


def test_shutdown_fails_open_streams(make_engine):
    async def main():
        engine = AsyncEngine(make_engine())
        await engine.start()
        task = asyncio.create_task(_collect(engine, "s", PROMPTS[0], LONG))
        await _wait_until(lambda: engine.make_stats().num_running == 1)
        await engine.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            await task
        await engine.shutdown()  # idempotent
        return engine

    engine = asyncio.run(asyncio.wait_for(main(), timeout=60))
    engine.engine.abort("s")
