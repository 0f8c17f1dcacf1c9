"""A checkpoint's safetensors files, opened (mmap) and checked against the config before any weight is read.

Everything is checked up front: the index and every shard it names, each file's header, and every tensor's
name and shape against what the config implies (`layout.expected_tensors`), and its dtype: 16/32-bit, or
in an FP8 checkpoint (config.json's `quantization_config`, `checkpoint/fp8.py`) F8_E4M3 with its
weight_scale. Any problem is a `CheckpointError` naming the tensor and the file.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from moe_runtime.checkpoint import fp8
from moe_runtime.checkpoint.layout import (
    IGNORED,
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    SINGLE_FILE,
    expected_tensors,
)
from moe_runtime.config import ModelConfig
from moe_runtime.errors import CheckpointError


class CheckpointFiles:
    """The safetensors files of a checkpoint, opened (mmap) and checked against the config.

    Use as a context manager; `get(name)` reads one tensor. The expert store reuses this to keep cold
    experts in the mmap instead of in memory. `fp8`: the FP8 format from config.json, or None (16 bits).
    """

    def __init__(self, model_dir: str | Path, cfg: ModelConfig):
        self.dir = Path(model_dir)
        self._stack = ExitStack()
        self._files: dict[str, object] = {}
        self.fp8 = fp8.checkpoint_fp8(self.dir)
        self.location = self._resolve()  # tensor name -> file name
        try:
            self._open_and_check(cfg)
        except BaseException:
            self.close()
            raise

    def _resolve(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
            for name, shard in sorted(weight_map.items()):
                if not (self.dir / shard).is_file():
                    raise CheckpointError(f"{index}: shard {shard} (holding tensor {name}) is missing from {self.dir}")
            return dict(weight_map)
        if (self.dir / SINGLE_FILE).is_file():
            return {}  # filled from the file's header in _open_and_check
        raise CheckpointError(f"{self.dir}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def _open_and_check(self, cfg: ModelConfig) -> None:
        files = sorted(set(self.location.values())) or [SINGLE_FILE]
        found: dict[str, str] = {}
        for fname in files:
            try:
                handle = self._stack.enter_context(safe_open(str(self.dir / fname), framework="pt", device="cpu"))
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{self.dir / fname}: truncated or corrupt safetensors file ({e})") from None
            self._files[fname] = handle
            for name in handle.keys():
                found[name] = fname
        if self.location:
            for name, fname in sorted(self.location.items()):
                if found.get(name) != fname:
                    raise CheckpointError(f"{self.dir / fname}: tensor {name} is named in {INDEX_FILE} but absent")
        self.location = found
        expected = expected_tensors(cfg)
        for name, shape in expected.items():
            if name not in found:
                raise CheckpointError(f"{self.dir}: tensor {name} is missing (expected shape {list(shape)})")
            got = tuple(self._files[found[name]].get_slice(name).get_shape())
            if got != shape:
                raise CheckpointError(
                    f"{self.dir / found[name]}: tensor {name} has shape {list(got)}, expected {list(shape)}"
                )
            self._check_dtype(name, shape, found)
        for name, fname in sorted(found.items()):
            tied_head = name == "lm_head.weight" and cfg.tie_word_embeddings
            scale = self.fp8 is not None and fp8.is_scale_tensor(name) and self._scales_fp8_weight(name, found)
            if name not in expected and not tied_head and not IGNORED.fullmatch(name) and not scale:
                raise CheckpointError(f"{self.dir / fname}: unexpected tensor {name} for a {cfg.architecture}")

    def _dtype(self, name: str, found: dict[str, str]) -> str:
        return self._files[found[name]].get_slice(name).get_dtype()

    def _check_dtype(self, name: str, shape: tuple[int, ...], found: dict[str, str]) -> None:
        """16/32-bit, or F8_E4M3 with a valid weight_scale in an FP8 checkpoint (`fp8.check_fp8_weight`)."""
        dtype, where = self._dtype(name, found), self.dir / found[name]
        if dtype in SAFETENSORS_DTYPES:
            return
        if dtype != fp8.FP8_DTYPE or self.fp8 is None:
            fp8_note = (f", or {fp8.FP8_DTYPE} with a weight_scale (config.json's quantization_config has "
                        "quant_method 'fp8')" if self.fp8 is None else f", or {fp8.FP8_DTYPE} with a weight_scale")
            raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}; allowed: "
                                  f"{sorted(SAFETENSORS_DTYPES)}{fp8_note}")
        scale = fp8.scale_name(name)
        scale_dtype = self._dtype(scale, found) if scale in found else None
        scale_shape = tuple(self._files[found[scale]].get_slice(scale).get_shape()) if scale in found else None
        fp8.check_fp8_weight(name, shape, scale_dtype, scale_shape, str(where))

    def _scales_fp8_weight(self, name: str, found: dict[str, str]) -> bool:
        """Whether scale tensor `name` belongs to an F8_E4M3 weight of this checkpoint (X.weight_scale, or a
        static X.input_scale beside such a weight)."""
        weight = name.removesuffix(fp8.SCALE_SUFFIX) if not name.endswith(fp8.INPUT_SCALE) \
            else name.removesuffix(fp8.INPUT_SCALE) + ".weight"
        return weight in found and self._dtype(weight, found) == fp8.FP8_DTYPE

    def get(self, name: str) -> torch.Tensor:
        fname = self.location[name]
        try:
            return self._files[fname].get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{self.dir / fname}: cannot read tensor {name} ({e})") from None

    def nbytes(self) -> int:
        return sum((self.dir / f).stat().st_size for f in set(self.location.values()))

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
