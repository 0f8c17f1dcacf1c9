"""A step's flat batch: the tokens of several sequences in one row list, with their KV slots and pages.

Built on the host as plain lists (`HostBatch.add` per sequence), then moved to the model's device in one
copy (`HostBatch.to_device`). The model runner builds one per step; the draft model of speculative decoding
(engine/spec/draft.py) builds its own over the same block tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moe_runtime.engine.forward import StepInputs
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.kernels.attention_reference import PagedBatch

# B sequences, T flat tokens, N sample rows, W block-table width


@dataclass
class HostBatch:
    """A step's flat batch as host lists, before it goes to the device."""

    block_size: int
    input_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    slots: list[int] = field(default_factory=list)  # [T] KV slot of each token
    query_start_loc: list[int] = field(default_factory=lambda: [0])  # [B + 1]
    context_lens: list[int] = field(default_factory=list)  # [B]
    tables: list[list[int]] = field(default_factory=list)  # B block tables, ragged
    sample_rows: list[int] = field(default_factory=list)  # [N] rows whose logits are computed

    @property
    def num_rows(self) -> int:
        return len(self.input_ids)

    def add(self, tokens: list[int], block_ids: list[int], start: int, num_samples: int = 0) -> None:
        """Append a sequence computing `tokens` now, at positions start, start + 1, ..., after `start` tokens
        already in the KV cache; `block_ids` must cover them all. Its last `num_samples` rows get logits.

        Example, block_size 4, blocks [7, 2]: tokens [d, e] from start 3 are rows at positions (3, 4) in slots
        (7*4 + 3, 2*4 + 0) = (31, 8), with a context of 5 tokens.
        """
        end, bs = start + len(tokens), self.block_size
        assert 0 <= start < end and 0 <= num_samples <= end - start, (start, end, num_samples)
        row0 = self.num_rows
        self.input_ids.extend(tokens)
        self.positions.extend(range(start, end))
        self.slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
        self.query_start_loc.append(row0 + end - start)
        self.context_lens.append(end)
        self.tables.append(block_ids)
        self.sample_rows.extend(range(row0 + end - start - num_samples, row0 + end - start))

    def to_device(self, device: torch.device) -> tuple[StepInputs, torch.Tensor]:
        """The batch's tensors on `device`: int32 from one pinned buffer in one copy on CUDA (with the triton
        kernels' `PagedBatch` as views of it), int64 built in place on CPU. Also returns the sample rows [N]
        on the device."""
        T, B = len(self.input_ids), len(self.context_lens)
        W = max(len(t) for t in self.tables)
        padded = [x for t in self.tables for x in (*t, *[0] * (W - len(t)))]  # [B * W]
        parts = (self.input_ids, self.positions, self.slots, self.query_start_loc, self.context_lens,
                 self.sample_rows, padded)
        if device.type == "cuda":
            staged = torch.tensor([x for p in parts for x in p], dtype=torch.int32, pin_memory=True)
            flat = staged.to(device, non_blocking=True)
        else:
            flat = torch.tensor([x for p in parts for x in p], dtype=torch.long)
        ids, pos, slots, qsl, ctx, rows, tables = flat.split([len(p) for p in parts])
        tables = tables.view(B, W)
        qsl_host = self.query_start_loc
        paged = PagedBatch(tables, ctx, qsl, max(qsl_host[i + 1] - qsl_host[i] for i in range(B)))
        meta = AttentionMetadata(
            query_start_loc=qsl_host,
            context_lens=self.context_lens,
            slot_mapping=slots,
            block_tables=tables,
            paged_batch=paged if device.type == "cuda" else None,
        )
        decode = T == B and all(c > 1 for c in self.context_lens)
        return StepInputs(ids, pos, meta, decode), rows
