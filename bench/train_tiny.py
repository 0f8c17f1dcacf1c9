"""Train the `tiny-trained` demo model: a small Mixtral whose router has learned real structure.

Random weights route tokens uniformly at random, the worst case for an expert cache and not what users
see. This script trains a Mixtral-architecture model (4 layers, 8 experts, top-2, ~2.4M parameters) for a
few minutes on CPU, on Python standard-library sources read from this interpreter's installation, with a
byte-level BPE tokenizer trained on the same text. Fixed seed; the result is committed (bf16, ~5 MB) under
moe_runtime/presets/assets/tiny-trained/ and written by `moe-runtime init-model --preset tiny-trained DIR`.

transformers' MixtralForCausalLM is the trainer (a dev dependency, never imported by the runtime); it saves
the hub tensor names (`block_sparse_moe.experts.{e}.w1|w2|w3`), which the loader reads.

    .venv/bin/python bench/train_tiny.py [--steps 200] [--out moe_runtime/presets/assets/tiny-trained]

`--draft` trains `tiny-trained-draft`, the draft model of speculative decoding for tiny-trained: a quarter of
its size (2 layers, hidden 64), on the same corpus with tiny-trained's own tokenizer (a draft must share the
vocabulary), committed under moe_runtime/presets/assets/tiny-trained-draft/:

    .venv/bin/python bench/train_tiny.py --draft
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from moe_runtime.presets.bpe import SPECIAL_TOKENS

ASSETS = Path(__file__).resolve().parents[1] / "moe_runtime" / "presets" / "assets"
DEFAULT_OUT = ASSETS / "tiny-trained"
DRAFT_OUT = ASSETS / "tiny-trained-draft"
HF_CONFIG = {
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 160,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 2048,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-5,
    "router_aux_loss_coef": 0.02,  # keeps experts balanced enough that all of them are used
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# The draft: fewer and narrower layers, the same vocabulary, positions and special tokens.
DRAFT_CONFIG = {**HF_CONFIG, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32}


def stdlib_text(max_bytes: int) -> str:
    """The first `max_bytes` of this Python's top-level stdlib modules, in sorted file order."""
    parts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return "\n".join(parts)[:max_bytes]


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE over `text`, with the same special tokens and template as moe_runtime.presets.bpe."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(), trainer)
    shortfall = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if shortfall > 0:
        tok.add_special_tokens([f"<reserved_{i}>" for i in range(shortfall)])
    bos = SPECIAL_TOKENS[1]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="default: the committed asset directory")
    ap.add_argument("--draft", action="store_true", help="train the draft model with tiny-trained's tokenizer")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)  # 2 threads ran 10x slower on shared cores
    ap.add_argument("--text-bytes", type=int, default=3_000_000)
    args = ap.parse_args()
    from transformers import MixtralConfig, MixtralForCausalLM  # dev dependency, only here

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    hf_config = DRAFT_CONFIG if args.draft else HF_CONFIG
    args.out = args.out or (DRAFT_OUT if args.draft else DEFAULT_OUT)
    text = stdlib_text(args.text_bytes)
    tok = Tokenizer.from_file(str(DEFAULT_OUT / "tokenizer.json")) if args.draft else \
        train_tokenizer(text, HF_CONFIG["vocab_size"])
    ids = torch.tensor(tok.encode(text, add_special_tokens=False).ids)  # [N]
    print(f"corpus: {len(text) / 1e6:.1f} MB of stdlib sources -> {len(ids) / 1e6:.2f} M tokens")
    cfg = MixtralConfig(**hf_config, output_router_logits=True)
    model = MixtralForCausalLM(cfg)
    model.set_experts_implementation("grouped_mm")  # fastest of eager / grouped_mm / batched_mm on CPU
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[s: s + args.seq] for s in starts.tolist()])  # [B, seq]
        out = model(input_ids=batch, labels=batch)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {out.loss.item():.3f}  aux {out.aux_loss.item():.3f}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(args.out)
    tok.save(str(args.out / "tokenizer.json"))
    unk, bos, eos = SPECIAL_TOKENS
    tok_config = {"add_bos_token": True, "add_eos_token": False, "bos_token": bos, "eos_token": eos,
                  "unk_token": unk, "model_max_length": HF_CONFIG["max_position_embeddings"],
                  "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    (args.out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    (args.out / "generation_config.json").unlink(missing_ok=True)
    print(f"wrote {args.out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
