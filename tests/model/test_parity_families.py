"""Parity with the reference implementations of the other families: transformers' Qwen3MoeForCausalLM,
Qwen2MoeForCausalLM and OlmoeForCausalLM on the same checkpoints (as test_parity.py does for Mixtral).

fp32: logits within 1e-5 of the reference's, greedy tokens identical with full recompute and through the
paged KV cache. 16-bit: these families' routers round the routing weights to the activation dtype (ours
keep them in fp32), so logits are close rather than equal, and each greedy token through the paged cache
must be the reference's argmax within `TIE_ATOL`, checked teacher-forced on the reference's own logits.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from parity_cases import NEW_TOKENS, PROMPT, greedy_paged, greedy_recompute, hf_greedy

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.presets.configs import preset_config
from moe_runtime.presets.init_model import write_checkpoint

# name, preset, overrides, shard size (None: one file). Each family's preset as released (Qwen3: 128
# experts top-8 renormalized, head_dim != hidden / heads; Qwen2: 60 experts top-4, shared expert, q/k/v
# bias; OLMoE: 64 experts top-8), then the variants its config.json allows: dense layers among sparse ones
# (`mlp_only_layers` and `decoder_sparse_step`), biases on or off, top-k renormalized or not, tied
# embeddings, one key/value head, a sliding window shorter than prompt plus generation, clipped q/k/v.
CONFIGS = (
    ("qwen3", "tiny-qwen3moe", {}, None),
    ("qwen3-dense-bias", "tiny-qwen3moe", dict(
        num_hidden_layers=4, mlp_only_layers=[2], decoder_sparse_step=2, intermediate_size=200,
        moe_intermediate_size=40, attention_bias=True, norm_topk_prob=False, num_experts=6, num_experts_per_tok=3,
        hidden_size=96, num_attention_heads=3, num_key_value_heads=1, head_dim=32, tie_word_embeddings=True,
    ), 64 * 1024),
    ("qwen3-window", "tiny-qwen3moe", dict(use_sliding_window=True, sliding_window=8, num_experts=16,
                                           rope_theta=10000.0), None),
    ("qwen2", "tiny-qwen2moe", {}, None),
    ("qwen2-dense", "tiny-qwen2moe", dict(
        num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True, qkv_bias=False, num_experts=5,
        num_experts_per_tok=2, shared_expert_intermediate_size=96, tie_word_embeddings=True,
    ), 64 * 1024),
    ("olmoe", "tiny-olmoe", {}, None),
    ("olmoe-clip-bias", "tiny-olmoe", dict(
        clip_qkv=0.5, attention_bias=True, norm_topk_prob=True, num_experts=6, num_experts_per_tok=2,
        hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
    ), None),
)
# fp32 logits may differ in the last bits where SDPA picks another blocking for another sequence length.
ATOL = 1e-5
TIE_ATOL = 0.07  # bf16: about two ulps of the logits' magnitude (|logit| < 8)


@pytest.fixture(scope="module", params=CONFIGS, ids=[c[0] for c in CONFIGS])
def checkpoint(request, tmp_path_factory):
    name, preset, overrides, shard = request.param
    return write_checkpoint(tmp_path_factory.mktemp(name), preset_config(preset, **overrides), seed=3,
                            max_shard_bytes=shard)


def hf_model(path, dtype):
    arch = transformers.AutoConfig.from_pretrained(path).architectures[0]
    return getattr(transformers, arch).from_pretrained(path, dtype=dtype).eval()


def test_logits_match_fp32(checkpoint):
    ours, ref = load_model(checkpoint, dtype="float32"), hf_model(checkpoint, torch.float32)
    assert type(ours).__name__ == type(ref).__name__
    prompts = [PROMPT, PROMPT[:4], [1, 900, 901]]
    h = ours(torch.tensor(sum(prompts, [])), torch.cat([torch.arange(len(p)) for p in prompts]),
             AttentionMetadata.for_prompts([len(p) for p in prompts]))
    logits = ours.compute_logits(h)
    start = 0
    for p in prompts:  # flat batch of three sequences vs each run alone by the reference
        with torch.no_grad():
            expected = ref(torch.tensor([p])).logits[0].float()
        torch.testing.assert_close(logits[start:start + len(p)], expected, atol=ATOL, rtol=0)
        start += len(p)


def test_greedy_tokens_match_fp32(checkpoint):
    ours, ref = load_model(checkpoint, dtype="float32"), hf_model(checkpoint, torch.float32)
    expected = hf_greedy(ref, PROMPT, NEW_TOKENS)
    assert len(set(expected)) > 4, "degenerate reference output makes a weak test"
    assert greedy_recompute(ours, PROMPT, NEW_TOKENS) == expected
    assert greedy_paged(ours, PROMPT, NEW_TOKENS) == expected


def test_bf16_as_close_as_the_reference_in_bf16(checkpoint):
    """Prompt logits: our bf16 model is as far from the fp32 reference as the reference's own bf16 run is
    (both round at the same points but for the routing weights), at worst and on average."""
    ours, ref, ref32 = (load_model(checkpoint, dtype="bfloat16"), hf_model(checkpoint, torch.bfloat16),
                        hf_model(checkpoint, torch.float32))
    for p in (PROMPT, [1, 900, 901, 5, 6, 7, 300, 301, 302, 1200, 33, 7, 7, 7, 2000, 64, 128]):
        logits = ours.compute_logits(ours(torch.tensor(p), torch.arange(len(p)), AttentionMetadata.for_prompts([len(p)])))
        with torch.no_grad():
            hf16, hf32 = (m(torch.tensor([p])).logits[0].float() for m in (ref, ref32))
        ours_err, hf_err = (logits - hf32).abs(), (hf16 - hf32).abs()
        assert ours_err.max() <= 1.5 * hf_err.max() + 0.02, f"{ours_err.max():.3f} vs {hf_err.max():.3f}"
        assert ours_err.mean() <= 1.25 * hf_err.mean() + 0.002, f"{ours_err.mean():.4f} vs {hf_err.mean():.4f}"


def test_bf16_greedy_tokens_are_the_reference_argmax(checkpoint):
    ours, ref = load_model(checkpoint, dtype="bfloat16"), hf_model(checkpoint, torch.bfloat16)
    got = greedy_paged(ours, PROMPT, NEW_TOKENS)
    with torch.no_grad():
        logits = ref(torch.tensor([PROMPT + got[:-1]])).logits[0, len(PROMPT) - 1:].float()  # [N, V]
    chosen = logits.gather(1, torch.tensor(got)[:, None])[:, 0]  # [N]
    gap = logits.max(dim=1).values - chosen
    assert gap.max() <= TIE_ATOL, f"token {int(gap.argmax())} is {float(gap.max())} below the reference's argmax"
