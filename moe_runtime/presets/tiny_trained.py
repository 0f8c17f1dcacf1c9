"""The trained embedded models, small Mixtrals trained on Python stdlib sources (bench/train_tiny.py):

    tiny-trained        4 layers, hidden 128, 8 experts, top-2 (~2.4M parameters, bf16 ~5 MB)
    tiny-trained-draft  2 layers, hidden 64, tiny-trained's tokenizer: its draft model for speculative
                        decoding (`speculative.method: draft`)

Unlike the random presets, their routers have learned structure (tokens of a kind go to the same experts),
so expert caching and prefetch behave as they do on real models, and their outputs repeat the way real code
does, which speculative decoding feeds on. Training needs transformers (a dev dependency the runtime never
imports) and minutes of CPU, so the checkpoints are committed under `assets/NAME/` and
`init-model --preset NAME DIR` copies them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from moe_runtime.errors import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"
TRAINED = {"tiny-trained": "", "tiny-trained-draft": " --draft"}  # name -> its bench/train_tiny.py flag
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ASSET_DIR = ASSETS / "tiny-trained"


def write_trained(name: str, out_dir: str | Path) -> Path:
    """Copy the committed checkpoint `name` (a key of TRAINED) into `out_dir` (created). Returns it."""
    assert name in TRAINED, name
    src = ASSETS / name
    missing = [f for f in FILES if not (src / f).is_file()]
    if missing:
        raise ConfigError(
            f"preset={name!r}: {src} lacks {missing}; re-create it with "
            f"`python bench/train_tiny.py{TRAINED[name]}` (needs the dev extra: transformers)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copyfile(src / f, out / f)
    return out


def write_tiny_trained(out_dir: str | Path) -> Path:
    """`write_trained("tiny-trained", out_dir)`."""
    return write_trained("tiny-trained", out_dir)
