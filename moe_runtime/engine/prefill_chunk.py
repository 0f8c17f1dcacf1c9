"""How many prompt tokens a step prefills: on the CPU fast path, sized by measurement on the loaded model.

A long prompt is prefilled in chunks that share steps with running decodes (engine/scheduler.py). Every
running request's next token waits for the whole step, so the chunk sets the inter-token latency while
prompts arrive; a chunk well below where the model's GEMMs saturate wastes prefill throughput. Where that
point lies depends on the chip and the model (a constant written for one machine is wrong on the next:
STYLE.md 20), so at the first engine start on a machine the CPU fast path times one prompt chunk of the
loaded model at 16, 32, 64, ... new tokens up to the limit (`ladder`) and takes the smallest chunk whose
throughput is within TOLERANCE of the best measured (`choose_chunk`). The choice and its figures are cached
in the CPU plan (kernels/cpu/dispatch.py `ChunkPlan`): later starts on the machine measure nothing.

Start-up cost: each size is timed as the best of ROUNDS forwards; the ladder stops once PATIENCE sizes in
a row gain less than MIN_GAIN over the best so far (throughput has stopped improving), and before a size
whose predicted cost would take the whole measurement past BUDGET_S seconds. Once per machine and model
shape: `tiny` (bf16) ~0.2 s, its ladder rising to the top; `mini` (bf16, 2 threads of a Zen 4 EPYC) ~6 s,
the budget ending it before 2048 tokens.

Each measured chunk is a prompt's first: sizes are ranked by that. Later chunks also attend to the prefix
and take longer (a 256-token chunk of `mini` after 1792 cached tokens: ~35% longer than the first).

`engine.prefill_chunk` (config/sections.py): "auto" uses the measured chunk where there is one (the local
executor on the CPU fast path), else `engine.max_num_batched_tokens` (GPU, `model.exact`, fp32 weights,
offloaded experts, the Ray executor: no measurement there); an int fixes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from moe_runtime.config import EngineConfig, ModelConfig
from moe_runtime.engine.batch import HostBatch
from moe_runtime.engine.forward import EagerForward
from moe_runtime.kernels.attention import KVCache
from moe_runtime.kernels.cpu.dispatch import ChunkPlan
from moe_runtime.model.causal_lm import CausalLM

log = logging.getLogger(__name__)

# The smallest chunk within this share of the best throughput measured: a chunk that prefills at 90% of the
# best rate while making every running decode wait for less is the better trade.
TOLERANCE = 0.10
FIRST = 16  # the ladder's first chunk: below it a step is mostly the decodes it shares with
ROUNDS = 2  # timed forwards per size, the best kept (the first of a new shape pays one-off set-up)
# A size "improves" when its throughput beats the best so far by at least this much (a shared host's
# timings move by a few percent from run to run); PATIENCE sizes in a row without it end the ladder, so
# that one noisy or dipping size does not.
MIN_GAIN = 0.05
PATIENCE = 2
BUDGET_S = 10.0  # seconds of timed forwards the whole ladder may take (estimated, see `run_ladder`)


def ladder(limit: int, first: int = FIRST) -> tuple[int, ...]:
    """Chunk sizes measured: doubling from `first` up to `limit`, and `limit` itself.

    >>> ladder(100), ladder(2048)[-3:], ladder(8)
    ((16, 32, 64, 100), (512, 1024, 2048), (8,))
    """
    out, n = [], min(first, limit)
    while n < limit:
        out.append(n)
        n *= 2
    return (*out, limit)


def run_ladder(seconds_of: Callable[[int], float], sizes: Sequence[int],
               budget_s: float = BUDGET_S) -> list[tuple[int, float]]:
    """Measure `sizes` in order while throughput improves and the budget lasts; returns (chunk, tok/s) pairs.

    seconds_of(n): seconds of one forward of a chunk of n new tokens (the best of ROUNDS). The budget
    counts ROUNDS times each size's best, and a size is skipped when its cost, predicted from the last one
    at the same tokens per second (an upper bound while throughput still rises), would go past it.

    >>> rate = {16: 100.0, 32: 180.0, 64: 200.0, 128: 205.0, 256: 190.0, 512: 400.0}
    >>> run_ladder(lambda n: n / rate[n], (16, 32, 64, 128, 256, 512))
    [(16, 100.0), (32, 180.0), (64, 200.0), (128, 205.0), (256, 190.0)]
    """
    out: list[tuple[int, float]] = []
    spent, best, stale = 0.0, 0.0, 0
    for n in sizes:
        if out and spent + ROUNDS * n / out[-1][1] > budget_s:
            log.info("prefill chunk ladder: stopped before %d tokens (%.0f s budget)", n, budget_s)
            break
        s = seconds_of(n)
        spent += ROUNDS * s
        rate = n / s
        out.append((n, rate))
        stale = 0 if rate >= best * (1 + MIN_GAIN) else stale + 1
        best = max(best, rate)
        if stale >= PATIENCE:
            break
    return out


def choose_chunk(measured: Sequence[tuple[int, float]], tolerance: float = TOLERANCE) -> int:
    """The smallest chunk whose throughput is within `tolerance` of the best measured (ties: the smaller).

    measured: (chunk tokens, tokens per second) pairs, chunks ascending.

    >>> choose_chunk([(16, 100.0), (32, 180.0), (64, 200.0), (128, 205.0)])
    64
    """
    if not measured:
        raise ValueError("measured=[]: no (chunk, tokens/s) pair to choose from; measure at least one chunk")
    chunks = [n for n, _ in measured]
    if chunks != sorted(set(chunks)) or chunks[0] <= 0:
        raise ValueError(f"measured chunks {chunks}: allowed: distinct positive sizes in ascending order")
    best = max(rate for _, rate in measured)
    return next(n for n, rate in measured if rate >= best * (1 - tolerance))


def plan_prefill(model: CausalLM, kv_caches: list[KVCache], limit: int) -> ChunkPlan:
    """Time prefill chunks of the loaded model (`run_ladder` over `ladder(limit)`) and choose one.

    Each forward is a prompt's first chunk of n tokens (positions 0..n-1), keys and values written to KV
    blocks 0.. (free at start-up; a request's blocks are written before they are read), through the eager
    forward that runs every prompt chunk (engine/forward.py). Token ids are seeded random draws from the
    vocabulary, so that the router spreads them over the experts as real text does (one repeated id would
    send every token to the same top-k experts).
    """
    block_size = kv_caches[0][0].shape[1]
    assert limit <= kv_caches[0][0].shape[0] * block_size, (limit, kv_caches[0][0].shape)
    forward = EagerForward(model, kv_caches)
    ids = torch.randint(model.config.vocab_size, (limit,), generator=torch.Generator().manual_seed(0)).tolist()

    def seconds_of(n: int) -> float:
        batch = HostBatch(block_size)
        batch.add(ids[:n], list(range(-(-n // block_size))), start=0)
        inputs, _ = batch.to_device(model.device)
        best = float("inf")
        for _ in range(ROUNDS):
            t0 = time.perf_counter()
            forward(inputs)
            best = min(best, time.perf_counter() - t0)
        return best

    t0 = time.perf_counter()
    measured = run_ladder(seconds_of, ladder(limit))
    plan = ChunkPlan(choose_chunk(measured), limit, tuple(n for n, _ in measured),
                     tuple(rate for _, rate in measured))
    log.info("CPU prefill chunk, measured in %.1f s: %s; the smallest within %.0f%% of the best",
             time.perf_counter() - t0, plan.summary(), 100 * TOLERANCE)
    return plan


def ladder_limit(engine: EngineConfig, model: ModelConfig, kv_tokens: int) -> int:
    """The largest chunk worth measuring: the step cap, and no more than the context (`engine.max_model_len`,
    else the model's) or the KV cache (`kv_tokens`) hold."""
    return min(engine.max_num_batched_tokens, engine.max_model_len or model.max_position_embeddings, kv_tokens)


def resolve_prefill_chunk(engine: EngineConfig, measured: int | None) -> int:
    """Prompt tokens per step: `engine.prefill_chunk` when it is an int, else the measured chunk (None: the
    step cap, `engine.max_num_batched_tokens`). Always in 1..max_num_batched_tokens.

    >>> resolve_prefill_chunk(EngineConfig(), 256), resolve_prefill_chunk(EngineConfig(), None)
    (256, 2048)
    >>> resolve_prefill_chunk(EngineConfig(prefill_chunk=64), 256)
    64
    """
    if engine.prefill_chunk != "auto":
        return engine.prefill_chunk
    return engine.max_num_batched_tokens if measured is None else min(measured, engine.max_num_batched_tokens)
