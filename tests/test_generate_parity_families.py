"""End to end for the other families: `moe-runtime generate --json` (tokenizer, engine, paged KV cache,
sampler, kernels) against transformers' Qwen3MoeForCausalLM, Qwen2MoeForCausalLM and OlmoeForCausalLM on the
same checkpoint, prompts batched together in one engine run, and again with prompts chunked over several
steps (`engine.max_num_batched_tokens=8`), as test_generate_parity.py does for Mixtral.

fp32: the greedy tokens equal transformers' `generate`, token for token. bf16 (the CPU fast path: these
families decode eagerly on its kernels, the native decode step being Mixtral's): each generated token must
be the reference's argmax within `TIE_ULPS` ulps of the logits' scale, checked teacher-forced on the
reference's own logits.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from transformers import AutoTokenizer, GenerationConfig

from moe_runtime.cli import main
from moe_runtime.presets.configs import preset_config
from moe_runtime.presets.init_model import write_checkpoint

PROMPTS = ("The expert router picks café", "日本語 and more words", "a")
NEW_TOKENS = 24
TIE_ULPS = 2  # bf16 ulps of the largest logit: where two logits tie in bf16 either choice is right
CHUNKED = ("--set", "engine.max_num_batched_tokens=8")
# dtype, preset, overrides: sizes and variants the model-level parity tests do not use
CASES = (
    ("float32", "tiny-qwen3moe", {}),
    ("float32", "tiny-qwen3moe", dict(num_hidden_layers=3, mlp_only_layers=[1], num_experts=32, hidden_size=96,
                                      num_attention_heads=6, num_key_value_heads=2, head_dim=32)),
    ("float32", "tiny-qwen2moe", dict(num_hidden_layers=3, decoder_sparse_step=3, intermediate_size=160)),
    ("float32", "tiny-olmoe", dict(clip_qkv=2.0, num_key_value_heads=2)),
    ("bfloat16", "tiny-qwen3moe", dict(num_experts=16)),
    ("bfloat16", "tiny-qwen2moe", {}),
    ("bfloat16", "tiny-olmoe", {}),
)


def generate_cli(ckpt, capsys, *extra) -> list[list[int]]:
    args = ["generate", "--model", str(ckpt), "--max-tokens", str(NEW_TOKENS), "--temperature", "0",
            "--ignore-eos", "--json", *extra]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert main(args) == 0
    return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("dtype, preset, overrides", CASES, ids=[f"{c[1]}-{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_generate_json_matches_transformers(tmp_path, capsys, dtype, preset, overrides):
    hf_config = preset_config(preset, torch_dtype=dtype, **overrides)
    ckpt = write_checkpoint(tmp_path / "m", hf_config, seed=11)
    ours = generate_cli(ckpt, capsys)
    assert generate_cli(ckpt, capsys, *CHUNKED) == ours  # prompts split over steps: the same tokens
    tok = AutoTokenizer.from_pretrained(ckpt)
    hf = getattr(transformers, hf_config["architectures"][0]).from_pretrained(ckpt, dtype=getattr(torch, dtype))
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            if dtype == "float32":
                expected = hf.eval().generate(ids, generation_config=gen)[0, ids.shape[1]:].tolist()
                assert got == expected, prompt
                continue
            logits = hf.eval()(torch.cat([ids, torch.tensor([got[:-1]])], dim=1)).logits[0, ids.shape[1] - 1:].float()
        chosen = logits.gather(1, torch.tensor(got)[:, None])[:, 0]  # [N]
        gap = logits.max(dim=1).values - chosen
        tie = TIE_ULPS * float(logits.abs().max()) / 128
        assert gap.max() <= tie, f"{prompt!r}: token {int(gap.argmax())} is {float(gap.max())} below argmax"
