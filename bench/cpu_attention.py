"""The native decode attention block (kernels/cpu `attention_decode`) vs the model's torch ops, same run.

    .venv/bin/python bench/cpu_attention.py                                  # mini's heads, 1 thread
    .venv/bin/python bench/cpu_attention.py --threads 2 --batches 16 --contexts 200,1000

One decode step's attention block of one layer (q/k/v projection, RoPE, KV cache write, attention over a
paged context, o_proj) for `batch` sequences of `context` tokens each: ours against `Attention.forward`
with the `cpu` attention backend (fp32 decode matmuls: the torch path of `model.exact: false`). Each call
takes the next of 8 layers' weights and caches (as a decode step does), so K, V and the weights come from memory, not the cache. The
pages of every sequence lie in random blocks of a 2048-block pool. Columns: milliseconds per call
(median of `--repeats` timings of 8 calls, ours and torch's taking turns), the ratio, and the K/V bytes
the call reads.
"""

from __future__ import annotations

import argparse

import torch
from cpu_linear import compare  # bench/ is the script's folder, first on sys.path

from moe_runtime.config import ModelConfig
from moe_runtime.kernels import cpu
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.model.layers import Attention, RotaryEmbedding
from moe_runtime.model.parts import ModelParts
from moe_runtime.presets.configs import preset_config

LAYERS = 8
NUM_BLOCKS = 2048
BLOCK_SIZE = 16


def random_pages(batch: int, context: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """block_tables [B, W] with each sequence's pages in random blocks; slots [B] of its newest token."""
    width = -(-context // BLOCK_SIZE)
    tables = torch.randperm(NUM_BLOCKS, generator=gen)[: batch * width].view(batch, width)
    slots = tables[:, (context - 1) // BLOCK_SIZE] * BLOCK_SIZE + (context - 1) % BLOCK_SIZE
    return tables, slots


def measure(layers, cfg: ModelConfig, batch: int, context: int, gen: torch.Generator, repeats: int) -> dict:
    """Median seconds of one round of LAYERS calls, ours and the torch ops', taking turns."""
    dtype = torch.bfloat16
    tables, slots = random_pages(batch, context, gen)
    lens = torch.full((batch,), context)
    meta = AttentionMetadata(list(range(batch + 1)), [context] * batch, slots, tables)
    x = (torch.randn(batch, cfg.hidden_size, generator=gen) / 10).to(dtype)
    cos, sin = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)(lens - 1, dtype)

    def ours():
        for attn, w_qkv, k, v in layers:
            cpu.attention_decode(
                x, w_qkv, attn.o_proj.weight, cos, sin, k, v, slots, tables, lens,
                attn.n_heads, attn.n_kv_heads, attn.sliding_window,
            )  # fmt: skip

    def torch_ops():
        for attn, _, k, v in layers:
            attn(x, (cos, sin), meta, (k, v))

    return compare({"ours": ours, "torch": torch_ops}, repeats, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--contexts", default="128,200,1000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not cpu.available():
        raise SystemExit("the native CPU kernels are not available here (see the warning above)")
    cfg = ModelConfig.from_hf(preset_config(args.preset))
    dtype, gen = torch.bfloat16, torch.Generator().manual_seed(0)
    KVH, Dh = cfg.num_key_value_heads, cfg.head_dim
    layers = []
    for _ in range(LAYERS):
        attn = Attention(cfg, ModelParts(attention="cpu")).to(dtype).requires_grad_(False)  # fp32 decode
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.03)
        w_qkv = attn.qkv_proj.weight
        caches = [torch.randn(NUM_BLOCKS, BLOCK_SIZE, KVH, Dh, generator=gen).to(dtype) for _ in range(2)]
        layers.append((attn, w_qkv, *caches))
    print(
        f"preset {args.preset} ({cfg.num_attention_heads} heads over {KVH} KV heads of {Dh}); threads "
        f"{args.threads}; bf16; median of {args.repeats} rounds of {LAYERS} calls (one per layer)\n"
    )
    print("| batch | context | ours ms | torch ms | ratio | K/V MB read |")
    print("|---|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        for context in map(int, args.contexts.split(",")):
            if batch * -(-context // BLOCK_SIZE) > NUM_BLOCKS:
                raise SystemExit(
                    f"--batches/--contexts: {batch} x {context} tokens exceed the {NUM_BLOCKS}-block pool"
                )
            t = measure(layers, cfg, batch, context, gen, args.repeats)
            kv_mb = 2 * batch * context * KVH * Dh * 2 / 1e6
            print(
                f"| {batch} | {context} | {t['ours'] / LAYERS * 1e3:.3f} | {t['torch'] / LAYERS * 1e3:.3f} | "
                f"{t['torch'] / t['ours']:.2f}x | {kv_mb:.2f} |"
            )


if __name__ == "__main__":
    main()
