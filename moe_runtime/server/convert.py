"""Wire conversion: engine outputs and telemetry snapshots to protobuf messages, and stats messages back
to the JSON shape the CLI prints (the placement planner reads that shape)."""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from moe_runtime.v1 import generation_pb2 as pb

if TYPE_CHECKING:  # annotations only: the client side (`moe-runtime stats`) must not import torch
    from moe_runtime.telemetry import ExpertStatsSnapshot, LatencySummary

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "eos": pb.FINISH_REASON_EOS,
    "abort": pb.FINISH_REASON_ABORT,
}
FINISH_REASON_NAMES = {v: (k or "") for k, v in FINISH_REASONS.items()}


def logprobs_to_proto(logprobs: Any) -> list[pb.TokenLogprob]:
    """Engine `TokenLogprob`s (token_id, logprob, top=((id, logprob), ...)) -> proto."""
    return [
        pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                        top=[pb.TopLogprob(token_id=t, logprob=p) for t, p in lp.top])
        for lp in logprobs or ()
    ]


def final_fields(out: Any) -> dict[str, Any]:
    """finish_reason, usage and timings of a finished `RequestOutput`."""
    m = out.metrics
    return {
        "finish_reason": FINISH_REASONS.get(out.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        "usage": pb.Usage(prompt_tokens=out.num_prompt_tokens, completion_tokens=out.num_output_tokens),
        "timings": pb.Timings(queue_s=m.queue_time_s or 0.0, time_to_first_token_s=m.ttft_s or 0.0,
                              total_s=m.e2e_s or 0.0),
    }


def chunk_to_proto(out: Any) -> pb.GenerateResponse:
    """One streamed `RequestOutput` delta -> one `GenerateResponse` chunk."""
    resp = pb.GenerateResponse(request_id=out.request_id, text=out.new_text, token_ids=out.new_token_ids,
                               logprobs=logprobs_to_proto(out.logprobs))
    if out.finished:
        for name, value in final_fields(out).items():
            if name == "finish_reason":
                resp.finish_reason = value
            else:
                getattr(resp, name).CopyFrom(value)
    return resp


def _latency(s: LatencySummary) -> pb.LatencySummary:
    return pb.LatencySummary(count=s.count, p50=s.p50, p99=s.p99, mean=s.mean)


def snapshot_to_proto(s: ExpertStatsSnapshot) -> pb.ExpertStats:
    return pb.ExpertStats(
        num_layers=s.layers, num_experts=s.experts, top_k=s.top_k, steps=s.steps, window_steps=s.window_steps,
        layers=[
            pb.LayerLoad(tokens_per_expert=w, total_tokens_per_expert=t, imbalance=i, entropy=h)
            for w, t, i, h in zip(s.tokens_per_expert, s.total_tokens_per_expert, s.imbalance, s.entropy,
                                  strict=True)
        ],
        mean_imbalance=s.mean_imbalance, mean_entropy=s.mean_entropy, num_running=s.num_running,
        num_waiting=s.num_waiting, kv_blocks_total=s.kv_blocks_total, kv_blocks_used=s.kv_blocks_used,
        num_preemptions=s.num_preemptions, time_to_first_token=_latency(s.time_to_first_token),
        time_per_output_token=_latency(s.time_per_output_token), queue_time=_latency(s.queue_time),
        cache=pb.CacheStats(hits=s.cache.hits, misses=s.cache.misses, bytes_moved=s.cache.bytes_moved,
                            hit_rate=s.cache.hit_rate, prefetch_accuracy=s.cache.prefetch_accuracy),
        tokens_processed=s.tokens_processed,
        ranks=[_rank_load(s, n) for n in range(len(s.rank_tokens))],
        rank_imbalance=s.rank_imbalance, worker_restarts=s.worker_restarts,
        prefix_cache=pb.PrefixCacheStats(**asdict(s.prefix_cache)),
        speculative=pb.SpeculativeStats(**asdict(s.speculative)),
        cost=pb.CostStats(**{k: v for k, v in asdict(s.cost).items() if v is not None}),  # None: unset
    )


def _rank_load(s: ExpertStatsSnapshot, n: int) -> pb.RankLoad:
    """Rank n's entry; timings and bytes are absent (0) until the executor reported them."""

    def at(values: list, default: Any = 0) -> Any:
        return values[n] if n < len(values) else default

    return pb.RankLoad(rank=n, tokens=s.rank_tokens[n], expert_copies=s.rank_expert_copies[n],
                       step_s=at(s.rank_step_s, 0.0), collective_s=at(s.rank_collective_s, 0.0),
                       expert_bytes=at(s.rank_expert_bytes),
                       experts=[pb.ExpertIds(ids=ids) for ids in at(s.rank_experts, [])])


def stats_to_dict(m: pb.ExpertStats) -> dict[str, Any]:
    """`ExpertStats` -> the same JSON shape as `ExpertStatsSnapshot.to_dict()` (read by the planner)."""

    def lat(x: pb.LatencySummary) -> dict[str, Any]:
        return {"count": x.count, "p50": x.p50, "p99": x.p99, "mean": x.mean}

    return {
        "layers": m.num_layers,
        "experts": m.num_experts,
        "top_k": m.top_k,
        "steps": m.steps,
        "window_steps": m.window_steps,
        "tokens_per_expert": [list(layer.tokens_per_expert) for layer in m.layers],
        "total_tokens_per_expert": [list(layer.total_tokens_per_expert) for layer in m.layers],
        "imbalance": [layer.imbalance for layer in m.layers],
        "entropy": [layer.entropy for layer in m.layers],
        "mean_imbalance": m.mean_imbalance,
        "mean_entropy": m.mean_entropy,
        "tokens_processed": m.tokens_processed,
        "num_running": m.num_running,
        "num_waiting": m.num_waiting,
        "kv_blocks_total": m.kv_blocks_total,
        "kv_blocks_used": m.kv_blocks_used,
        "num_preemptions": m.num_preemptions,
        "time_to_first_token": lat(m.time_to_first_token),
        "time_per_output_token": lat(m.time_per_output_token),
        "queue_time": lat(m.queue_time),
        "cache": {"hits": m.cache.hits, "misses": m.cache.misses, "bytes_moved": m.cache.bytes_moved,
                  "hit_rate": m.cache.hit_rate, "prefetch_accuracy": m.cache.prefetch_accuracy},
        "rank_tokens": [r.tokens for r in m.ranks],
        "rank_expert_copies": [r.expert_copies for r in m.ranks],
        "rank_imbalance": m.rank_imbalance,
        "rank_experts": [[list(layer.ids) for layer in r.experts] for r in m.ranks],
        "rank_step_s": [r.step_s for r in m.ranks],
        "rank_collective_s": [r.collective_s for r in m.ranks],
        "rank_expert_bytes": [r.expert_bytes for r in m.ranks],
        "worker_restarts": m.worker_restarts,
        "prefix_cache": {"queries": m.prefix_cache.queries, "hits": m.prefix_cache.hits,
                         "hit_rate": m.prefix_cache.hit_rate},
        "speculative": {"proposed_tokens": m.speculative.proposed_tokens,
                        "accepted_tokens": m.speculative.accepted_tokens,
                        "verifications": m.speculative.verifications,
                        "acceptance_rate": m.speculative.acceptance_rate,
                        "tokens_per_verification": m.speculative.tokens_per_verification},
        "cost": {"configured": m.cost.configured, "usd_per_hour": m.cost.usd_per_hour, "window_s": m.cost.window_s,
                 "prompt_tokens": m.cost.prompt_tokens, "generated_tokens": m.cost.generated_tokens,
                 **{key: getattr(m.cost, key) if m.cost.HasField(key) else None
                    for key in ("usd_per_million_prompt_tokens", "usd_per_million_generated_tokens")}},
    }
