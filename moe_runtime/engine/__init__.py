"""The engine: continuous batching over a paged KV cache (DESIGN.md section 3).

Public names: `LLMEngine` (synchronous), `AsyncEngine` (background step loop, async streams),
`SamplingParams`, `RequestOutput`, `TokenLogprob`, `EngineStats`.
"""

from moe_runtime.engine.async_engine import AsyncEngine
from moe_runtime.engine.llm_engine import LLMEngine
from moe_runtime.engine.outputs import EngineStats, RequestMetrics, RequestOutput, TokenLogprob
from moe_runtime.engine.sampling_params import SamplingParams

__all__ = [
    "AsyncEngine",
    "EngineStats",
    "LLMEngine",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
    "TokenLogprob",
]
