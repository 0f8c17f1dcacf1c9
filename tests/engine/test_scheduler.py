"""Scheduler and block manager without a model: budgets, chunking, preemption, and a property test."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from moe_runtime.config import EngineConfig
from moe_runtime.engine.block_manager import BlockManager
from moe_runtime.engine.request import Request
from moe_runtime.engine.sampling_params import SamplingParams
from moe_runtime.engine.scheduler import Scheduler
from moe_runtime.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

EOS = 2


class FakeRunner:
    """Mirrors the model runner's bookkeeping; 'samples' token 7, or EOS when the request id says so."""

    def __init__(self):
        self.num_tokens: dict[str, int] = {}

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        for rid in sched.finished_request_ids:
            self.num_tokens.pop(rid, None)
        for new in sched.new_requests:
            assert new.request_id not in self.num_tokens
            self.num_tokens[new.request_id] = len(new.token_ids)
        for cached in sched.cached_requests:
            assert cached.request_id in self.num_tokens
        ids, tokens = [], []
        for rid, n in sched.num_scheduled_tokens.items():
            assert n > 0
            if sched.num_computed_tokens[rid] + n == self.num_tokens[rid]:
                ids.append(rid)
                tokens.append([EOS if rid.startswith("eos") else 7])
                self.num_tokens[rid] += 1
        return ModelRunnerOutput(ids, tokens, [None] * len(ids))


def _scheduler(num_blocks=8, block_size=4, max_num_seqs=4, max_tokens=32) -> Scheduler:
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_tokens)
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def _request(rid: str, prompt_len: int, max_tokens: int) -> Request:
    return Request(rid, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), eos_token_ids=(EOS,))


def _step(s: Scheduler, runner: FakeRunner):
    sched = s.schedule()
    assert sched.total_num_scheduled_tokens <= s.max_num_batched_tokens
    assert len(sched.num_scheduled_tokens) <= s.max_num_seqs
    outs = s.update_from_output(sched, runner.execute(sched))
    s.block_manager.check_invariants()
    return sched, outs


def test_chunked_prefill_respects_the_token_budget():
    s, runner = _scheduler(num_blocks=16, max_tokens=5), FakeRunner()
    s.add(_request("a", 12, 2))
    s.add(_request("b", 3, 2))
    sched, _ = _step(s, runner)
    assert sched.num_scheduled_tokens == {"a": 5}
    sched, _ = _step(s, runner)
    assert sched.num_scheduled_tokens == {"a": 5}
    sched, outs = _step(s, runner)
    assert sched.num_scheduled_tokens == {"a": 2, "b": 3}  # a's last chunk, then b's whole prompt
    assert [o.request_id for o in outs] == ["a", "b"]  # both reached their ends and sampled
    sched, _ = _step(s, runner)
    assert sched.num_scheduled_tokens == {"a": 1, "b": 1}  # one owed token each


def test_preemption_takes_the_newest_and_recomputes_it():
    s, runner = _scheduler(num_blocks=4, block_size=4), FakeRunner()
    s.add(_request("old", 7, 8))  # 2 blocks, grows to 4
    s.add(_request("new", 7, 8))
    _step(s, runner)
    assert [r.request_id for r in s.running] == ["old", "new"] and s.block_manager.num_free == 0
    _step(s, runner)  # position 7: both still fit in 2 blocks
    sched, _ = _step(s, runner)  # position 8: old needs a third block, so new is preempted
    assert s.num_preemptions == 1 and [r.request_id for r in s.waiting] == ["new"]
    assert sched.num_scheduled_tokens == {"old": 1}
    assert sched.finished_request_ids == {"new"}  # the workers drop its state
    assert s.requests["new"].num_computed_tokens == 0 and s.requests["new"].num_tokens == 9
    sched, _ = _step(s, runner)  # resumed in the one free block: a 4-token chunk of its 9 tokens
    assert [n.request_id for n in sched.new_requests] == ["new"] and sched.num_scheduled_tokens["new"] == 4
    while s.has_unfinished():
        _step(s, runner)
    assert s.block_manager.num_used == 0


def test_abort_of_a_waiting_request():
    s, runner = _scheduler(max_num_seqs=1), FakeRunner()
    s.add(_request("a", 3, 4))
    s.add(_request("b", 3, 4))
    _step(s, runner)
    assert s.abort("b").finish_reason == "abort"
    assert s.abort("a").finish_reason == "abort"
    assert not s.has_unfinished() and s.block_manager.num_used == 0


# Operations of the property test: ("add", prompt_len, max_tokens, ends_with_eos) | ("abort", k) | ("step",)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 12), st.booleans()),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("step")),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=_ops, num_blocks=st.integers(8, 24), block_size=st.sampled_from([1, 2, 4, 16]),
       budget=st.integers(1, 40), max_num_seqs=st.integers(1, 6))
def test_random_add_abort_step_never_leaks_or_loses_requests(ops, num_blocks, block_size, budget, max_num_seqs):
    s = _scheduler(num_blocks, block_size, max_num_seqs, budget)
    runner = FakeRunner()
    added, ended = [], {}
    for op in ops:
        if op[0] == "add":
            _, prompt_len, max_tokens, eos = op
            req = _request(f"{'eos' if eos else 'r'}{len(added)}", prompt_len, max_tokens)
            if s.block_manager.blocks_needed(req.max_num_tokens) > num_blocks:
                continue  # the engine rejects these at add time
            s.add(req)
            added.append(req)
        elif op[0] == "abort" and added:
            rid = added[op[1] % len(added)].request_id
            req = s.abort(rid)
            if req is not None:
                ended[rid] = "abort"
        else:
            for out in _step(s, runner)[1]:
                if out.finished:
                    ended[out.request_id] = out.finish_reason
    for _ in range(10_000):  # drain: every request must finish
        if not s.has_unfinished():
            break
        for out in _step(s, runner)[1]:
            if out.finished:
                ended[out.request_id] = out.finish_reason
    assert not s.has_unfinished(), "requests stuck"
    assert s.block_manager.num_used == 0
    assert set(ended) == {r.request_id for r in added}
    for req in added:
        if ended[req.request_id] != "abort":
            want = "eos" if req.request_id.startswith("eos") else "length"
            assert ended[req.request_id] == want
            assert req.num_output_tokens == (1 if want == "eos" else req.params.max_tokens)
