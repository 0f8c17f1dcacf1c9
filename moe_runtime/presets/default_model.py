"""The embedded default model: the `tiny` preset, created once in the user's cache directory."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from moe_runtime.presets.init_model import init_model

DEFAULT_PRESET = "tiny"
DEFAULT_SEED = 0


def ensure_default_model(cache_dir: str | Path) -> Path:
    """Return `<cache_dir>/models/tiny`, writing it first if absent.

    The checkpoint is written into a temporary sibling directory and renamed into place, so a reader never
    sees half a checkpoint, and of two processes racing to create it one wins and the other reuses it.
    """
    target = Path(cache_dir) / "models" / DEFAULT_PRESET
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_PRESET}-", dir=target.parent))
    try:
        init_model(DEFAULT_PRESET, tmp, seed=DEFAULT_SEED)
        tmp.rename(target)
    except OSError:
        if not (target / "config.json").exists():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
