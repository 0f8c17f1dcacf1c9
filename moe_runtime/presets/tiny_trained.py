"""The `tiny-trained` embedded model: a small Mixtral trained on Python stdlib sources (bench/train_tiny.py).

Unlike the random presets, its router has learned structure (tokens of a kind go to the same experts), so
expert caching and prefetch behave as they do on real models. Training needs transformers (a dev
dependency the runtime never imports) and minutes of CPU, so the trained checkpoint (bf16, ~5 MB) is
committed under `assets/tiny-trained/` and `init-model --preset tiny-trained DIR` copies it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moe_runtime.errors import ConfigError

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny-trained"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def write_tiny_trained(out_dir: str | Path) -> Path:
    """Copy the committed tiny-trained checkpoint into `out_dir` (created). Returns the directory."""
    missing = [f for f in FILES if not (ASSET_DIR / f).is_file()]
    if missing:
        raise ConfigError(
            f"preset='tiny-trained': {ASSET_DIR} lacks {missing}; re-create it with "
            f"`python bench/train_tiny.py --out {ASSET_DIR}` (needs the dev extra: transformers)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(ASSET_DIR / f, out / f)
    return out
