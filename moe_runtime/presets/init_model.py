"""Write a complete HF Mixtral checkpoint from a seed: config.json, safetensors (one file or shards with an
index), tokenizer.json and tokenizer_config.json. The same preset and seed give the same bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from moe_runtime.checkpoint.layout import INDEX_FILE, SINGLE_FILE, expected_tensors, resolve_dtype
from moe_runtime.config import ModelConfig
from moe_runtime.presets.bpe import SPECIAL_TOKENS, train_tokenizer
from moe_runtime.presets.configs import preset_config


def random_weights(cfg: ModelConfig, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Seeded weights under hub names: N(0, std) matrices, unit norms, in the config's torch_dtype."""
    gen = torch.Generator().manual_seed(seed)
    dtype = resolve_dtype("auto", cfg)  # the config's torch_dtype
    tensors = {}
    for name, shape in expected_tensors(cfg).items():  # insertion order is fixed, so draws are too
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype)
        else:
            tensors[name] = (torch.randn(shape, generator=gen) * std).to(dtype)
    return tensors


def write_checkpoint(
    out_dir: str | Path,
    hf_config: dict[str, Any],
    seed: int = 0,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write a seeded checkpoint for `hf_config` into `out_dir` (created). Returns the directory.

    With `max_shard_bytes`, weights are split into `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json`, as the hub does for large models.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_hf(hf_config, "preset")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    tensors = random_weights(cfg, seed, std=hf_config.get("initializer_range", 0.02))
    _write_weights(out, tensors, max_shard_bytes)
    tok = train_tokenizer(cfg.vocab_size, seed)
    tok.save(str(out / "tokenizer.json"))
    unk, bos, eos = SPECIAL_TOKENS
    tok_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "model_max_length": cfg.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    return out


def init_model(preset: str, out_dir: str | Path, seed: int = 0, max_shard_bytes: int | None = None) -> Path:
    """`moe-runtime init-model --preset NAME OUT_DIR`: write the named embedded model."""
    return write_checkpoint(out_dir, preset_config(preset), seed, max_shard_bytes)


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    metadata = {"format": "pt"}
    if max_shard_bytes is None:
        save_file(tensors, str(out / SINGLE_FILE), metadata=metadata)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=metadata)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
