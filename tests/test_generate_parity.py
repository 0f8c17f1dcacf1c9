"""End to end: `moe-runtime generate --json` (tokenizer, engine, paged KV cache, sampler, kernels) against
transformers on the same checkpoint, prompts batched together in one engine run.

fp32: the greedy tokens equal transformers' `generate`, token for token. 16-bit: the engine may use other
GEMM blockings than the reference for large batches (fp32 copies of the weights on CPUs without native
bf16), so where two logits tie in bf16 either choice is right; each generated token must be the
reference's argmax within `TIE_ATOL`, checked teacher-forced on the reference's own logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig
from transformers import MixtralForCausalLM as HFMixtral

from moe_runtime.cli import main
from moe_runtime.presets.configs import preset_config
from moe_runtime.presets.init_model import write_checkpoint

PROMPTS = ("The expert router picks café", "日本語 and more words", "a")
NEW_TOKENS = 32
TIE_ATOL = {"bfloat16": 0.07, "float16": 0.01}  # about two ulps of the logits' magnitude (|logit| < 8)
# dtype, preset overrides: sizes none of the model-level parity tests use
CASES = (
    ("float32", dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=4, num_local_experts=3,
                     num_experts_per_tok=3, tie_word_embeddings=True)),
    ("float32", dict(hidden_size=160, num_attention_heads=5, num_key_value_heads=1, head_dim=48,
                     intermediate_size=200, num_local_experts=6, num_hidden_layers=3, sliding_window=7)),
    ("bfloat16", dict(hidden_size=160, num_attention_heads=6, num_key_value_heads=2, head_dim=48,
                      num_local_experts=6, num_experts_per_tok=2, num_hidden_layers=3)),
    ("float16", dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=4, num_local_experts=6,
                     num_experts_per_tok=1, sliding_window=5)),
)


def generate_cli(ckpt, capsys) -> list[list[int]]:
    args = ["generate", "--model", str(ckpt), "--max-tokens", str(NEW_TOKENS), "--temperature", "0",
            "--ignore-eos", "--json"]
    for p in PROMPTS:
        args += ["--prompt", p]
    assert main(args) == 0
    return [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]


@pytest.mark.parametrize("dtype, overrides", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_generate_json_matches_transformers(tmp_path, capsys, dtype, overrides):
    ckpt = write_checkpoint(tmp_path / "m", preset_config("tiny", torch_dtype=dtype, **overrides), seed=11)
    ours = generate_cli(ckpt, capsys)
    tok = AutoTokenizer.from_pretrained(ckpt)
    hf = HFMixtral.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()
    gen = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    for prompt, got in zip(PROMPTS, ours, strict=True):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            if dtype == "float32":
                expected = hf.generate(ids, generation_config=gen)[0, ids.shape[1]:].tolist()
                assert got == expected, prompt
                continue
            logits = hf(torch.cat([ids, torch.tensor([got[:-1]])], dim=1)).logits[0, ids.shape[1] - 1:].float()
        chosen = logits.gather(1, torch.tensor(got)[:, None])[:, 0]  # [N]
        gap = logits.max(dim=1).values - chosen
        assert gap.max() <= TIE_ATOL[dtype], f"{prompt!r}: token {int(gap.argmax())} is {float(gap.max())} below argmax"
