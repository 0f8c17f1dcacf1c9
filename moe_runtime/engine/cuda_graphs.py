"""Decode steps replayed from CUDA graphs: a captured step costs one launch on the host instead of ~15 per
layer, and the GPU runs the kernels back to back.

1. At start-up, for each batch-size bucket (1, 2, 4, 8, 16, 24, 32, ... up to `engine.cuda_graph_max_batch`),
   largest first, sharing one memory pool: run the model once eagerly on static input buffers (Triton
   compiles outside the capture), then capture a forward of that many one-token sequences.
2. A decode step of B sequences takes the smallest bucket >= B: its inputs are copied into the first B rows
   of the static buffers; padding rows get token 0 at position 0, KV slot -1 (the cache write skips them)
   and context length 0 (attention gives them zeros), so they touch no real sequence's state.
3. Replay; the first B rows of the captured output are the step's hidden states, and the step's router
   counts come from the captured routing ids' first B rows (padding rows left out).
Only device-side metadata reaches the captured kernels (`AttentionMetadata.paged_batch`); the host lists of
the captured metadata are placeholders, so this runs only with parts whose kernels need nothing from the
host (the `triton` attention and MoE backends: grids fixed by shapes, no syncs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_runtime.engine.forward import EagerForward, StepInputs
from moe_runtime.kernels.attention import AttentionMetadata, KVCache
from moe_runtime.kernels.attention_reference import PagedBatch
from moe_runtime.model.causal_lm import CausalLM

# B sequences (one token each), P the bucket B is padded to, W block-table width, D hidden, L layers

# Runs a captured bucket again on what the static buffers hold now: (hidden [P, D], routing ids of each sparse
# layer [P, A]).
Replay = Callable[[], tuple[torch.Tensor, list[torch.Tensor]]]


def buckets(max_batch: int) -> list[int]:
    """Batch sizes a graph is captured for: powers of two to 16, then every 8, then max_batch itself.

    >>> buckets(40)
    [1, 2, 4, 8, 16, 24, 32, 40]
    >>> buckets(3)
    [1, 2, 3]
    """
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 8))
    return sorted({*sizes, max_batch})


class CudaGraphForward:
    """Captured decode steps for batches up to `max_batch` sequences whose block tables fit `table_width`
    blocks; every other step runs eagerly."""

    def __init__(self, model: CausalLM, kv_caches: list[KVCache], max_batch: int, table_width: int):
        self.model, self.kv_caches = model, kv_caches
        self.eager = EagerForward(model, kv_caches)
        self.max_batch, self.table_width = max_batch, table_width
        dev, i32 = model.device, torch.int32
        self.input_ids = torch.zeros(max_batch, dtype=i32, device=dev)  # [P]
        self.positions = torch.zeros(max_batch, dtype=i32, device=dev)  # [P]
        self.slot_mapping = torch.full((max_batch,), -1, dtype=i32, device=dev)  # [P], -1: skip the write
        self.block_tables = torch.zeros(max_batch, table_width, dtype=i32, device=dev)  # [P, W]
        self.context_lens = torch.zeros(max_batch, dtype=i32, device=dev)  # [P], 0: attend to nothing
        self.query_start_loc = torch.arange(max_batch + 1, dtype=i32, device=dev)  # [P + 1]: one token each
        self._pool = None  # one memory pool for every bucket's graph
        self.replays: dict[int, Replay] = {}
        with torch.inference_mode():
            for size in sorted(buckets(max_batch), reverse=True):  # largest first: the others reuse its pool
                self.replays[size] = self._record(size)

    def _meta(self, size: int) -> AttentionMetadata:
        paged = PagedBatch(self.block_tables[:size], self.context_lens[:size], self.query_start_loc[: size + 1], 1)
        return AttentionMetadata(
            query_start_loc=list(range(size + 1)),  # placeholders: captured kernels read `paged_batch` only
            context_lens=[1] * size,
            slot_mapping=self.slot_mapping[:size],
            block_tables=self.block_tables[:size],
            paged_batch=paged,
        )

    def _args(self, size: int) -> tuple:
        """The model's arguments for a bucket: views of the static buffers."""
        return self.input_ids[:size], self.positions[:size], self._meta(size), self.kv_caches

    def _record(self, size: int) -> Replay:
        """Capture the forward of `size` one-token sequences on the static buffers."""
        args = self._args(size)
        self.model(*args)  # warm-up: Triton compiles outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            hidden = self.model(*args)  # [P, D], in the graph's memory
        self._pool = graph.pool()
        routing = self.model.routings()  # the captured routing ids, rewritten by each replay

        def replay() -> tuple[torch.Tensor, list[torch.Tensor]]:
            graph.replay()
            return hidden, routing

        return replay

    def applies(self, inputs: StepInputs) -> bool:
        meta = inputs.meta
        return (inputs.decode and meta.num_seqs <= self.max_batch
                and meta.block_tables is not None and meta.block_tables.shape[1] <= self.table_width)

    def __call__(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.applies(inputs):
            return self.eager(inputs)
        meta = inputs.meta
        B, W = meta.block_tables.shape
        size = min(b for b in self.replays if b >= B)  # the smallest captured bucket that holds B
        self.input_ids[:B].copy_(inputs.input_ids)
        self.positions[:B].copy_(inputs.positions)
        self.slot_mapping[:B].copy_(meta.slot_mapping)
        self.block_tables[:B, :W].copy_(meta.block_tables)
        self.context_lens[:B].copy_(meta.paged().context_lens)
        if size > B:  # padding rows: no cache write, no context
            self.input_ids[B:size].zero_()
            self.positions[B:size].zero_()
            self.slot_mapping[B:size].fill_(-1)
            self.context_lens[B:size].zero_()
        hidden, routing = self.replays[size]()
        counts = self.model.router_counts(B, routing)  # [L, E], padding rows left out
        return hidden[:B], counts
