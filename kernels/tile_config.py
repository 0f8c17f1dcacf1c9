"""Tile configs for the grouped GEMMs: tuned tables as data, nearest-M lookup, a heuristic default.

A table lives in `kernels/tuned/E={E},N={N},device_name={device},dtype={dtype}.json` (N is the
intermediate size I) and maps M, the number of tokens in the batch, to one `TileConfig`:

    {"1": {"block_m": 16, "block_n": 64, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 4}, ...}

An entry may add `"gemm2": {...}` (a full config with the same block_m) when grouped GEMM 2 runs best with
other tiles than GEMM 1: GEMM 1 keeps two accumulators (gate and up) per tile, GEMM 2 one, and their N
differ (I versus H), so their best output tiles can differ at large M.

`bench/tune_fused_moe.py` writes these files on a GPU. A lookup takes the entry whose M is nearest to the
batch's; with no table for the device it falls back to `default_tile_config`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

TUNED_DIR = Path(__file__).parent / "tuned"
# TODO(kernels): tables for the other families' shapes need a GPU session; until then they run on
# `default_tile_config`. On an H100/H200, bf16, for each of
#   python bench/tune_fused_moe.py --shape qwen3-30b-a3b --dtype bf16       # E=128, N=768, top-8
#   python bench/tune_fused_moe.py --shape qwen1.5-moe-a2.7b --dtype bf16   # E=60, N=1408, top-4
#   python bench/tune_fused_moe.py --shape olmoe-1b-7b --dtype bf16         # E=64, N=1024, top-8
# commit the kernels/tuned/E=...,N=...,device_name=...,dtype=bf16.json it writes. 8-bit experts have no
# table yet either: `--shape mixtral --dtype int8_w8a16` (and fp8_w8a16, and fp8_w8a8 on sm_89+).

# The file name's dtype -> (MoeShape.dtype, MoeShape.activations): the activations' dtype for 16/32-bit
# experts; for 8-bit experts (kernels/triton/fused_moe.py on QuantizedWeights) the weight format, and for
# fp8 experts that also quantize their activations (w8a8, `fused_moe_triton_w8a8_fp32`) the activations'
# dtype too: its tiles are tuned apart, since fp8 x fp8 tensor-core tiles and the w8a16 ones (weights widened
# in registers) run best at different shapes.
TABLE_FORMATS: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "fp32": (torch.float32, None),
    "fp16": (torch.float16, None),
    "bf16": (torch.bfloat16, None),
    "int8_w8a16": (torch.int8, None),
    "fp8_w8a16": (torch.float8_e4m3fn, None),
    "fp8_w8a8": (torch.float8_e4m3fn, torch.float8_e4m3fn),
}
_FORMAT_NAMES = {pair: name for name, pair in TABLE_FORMATS.items()}


@dataclass(frozen=True)
class TileConfig:
    """One launch shape for both grouped GEMMs (they share block_m, the alignment of the sorted rows)."""

    block_m: int  # rows (routed pairs) per tile; also the padding unit of `align`
    block_n: int  # output columns per tile
    block_k: int  # reduction step
    group_m: int  # M-blocks per group in the grouped (L2-friendly) program order
    num_warps: int = 4
    num_stages: int = 3
    gemm2: TileConfig | None = None  # grouped GEMM 2's own tiles (same block_m); None: these

    def __post_init__(self) -> None:
        if self.gemm2 is not None and (self.gemm2.block_m != self.block_m or self.gemm2.gemm2 is not None):
            raise ValueError(
                f"gemm2 must share block_m={self.block_m} and have no gemm2 of its own, got {self.gemm2}"
            )

    def for_gemm2(self) -> TileConfig:
        """The tiles grouped GEMM 2 launches with."""
        return self.gemm2 or self

    @classmethod
    def from_dict(cls, raw: dict) -> TileConfig:
        """The inverse of `dataclasses.asdict` (what the tuned files hold)."""
        gemm2 = raw.get("gemm2")
        return cls(**{**raw, "gemm2": cls.from_dict(gemm2) if gemm2 else None})


@dataclass(frozen=True)
class MoeShape:
    """What a tuned table is keyed by (besides M)."""

    num_experts: int  # E (resident slots S when offloading)
    intermediate: int  # I, the N of the tuned file name
    dtype: torch.dtype  # the activations' (16/32-bit experts) or the weights' 8-bit format
    device_name: str  # torch.cuda.get_device_name() with spaces as underscores, or "cpu"
    # What 8-bit weights are multiplied with when the GEMMs quantize the activations too (w8a8:
    # float8_e4m3fn); None: 16-bit activations (16-bit experts, w8a16)
    activations: torch.dtype | None = None

    @property
    def format(self) -> str:
        """The file name's dtype (`TABLE_FORMATS`).

        >>> MoeShape(8, 14336, torch.float8_e4m3fn, "NVIDIA_H200", torch.float8_e4m3fn).format
        'fp8_w8a8'
        """
        name = _FORMAT_NAMES.get((self.dtype, self.activations))
        if name is None:
            raise ValueError(f"no tuned-table format for weights/activations {self.dtype} x {self.activations}; "
                             f"allowed: {sorted(TABLE_FORMATS)}")
        return name


def table_path(shape: MoeShape, tuned_dir: Path = TUNED_DIR) -> Path:
    """The file a tuned table for `shape` lives in."""
    dtype = shape.format
    return (
        tuned_dir
        / f"E={shape.num_experts},N={shape.intermediate},device_name={shape.device_name},dtype={dtype}.json"
    )


@functools.lru_cache(maxsize=64)
def load_table(path: Path) -> tuple[tuple[int, TileConfig], ...]:
    """The (M, config) entries of a tuned file sorted by M, or () when there is none. Read once per path."""
    if not path.is_file():
        return ()
    raw = json.loads(path.read_text())
    return tuple(sorted((int(m), TileConfig.from_dict(cfg)) for m, cfg in raw.items()))


def _as_dict(cfg: TileConfig) -> dict:
    """cfg as the tuned files hold it: no "gemm2" key when GEMM 2 uses the same tiles."""
    out = asdict(cfg)
    if cfg.gemm2 is None:
        del out["gemm2"]
    else:
        del out["gemm2"]["gemm2"]
    return out


def save_table(path: Path, table: dict[int, TileConfig]) -> None:
    """Write a tuned table (the format `load_table` reads)."""
    data = {str(m): _as_dict(cfg) for m, cfg in sorted(table.items())}
    path.write_text(json.dumps(data, indent=1) + "\n")
    load_table.cache_clear()


def default_tile_config(num_tokens: int, top_k: int, num_experts: int) -> TileConfig:
    """Heuristic when nothing is tuned: small tiles and more programs while the GEMMs read weights
    (few rows per expert: decode), bigger tiles once each expert has enough rows to reuse them."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 16:
        return TileConfig(block_m=16, block_n=64, block_k=128, group_m=1, num_warps=4, num_stages=4)
    if rows_per_expert <= 128:
        return TileConfig(block_m=32, block_n=64, block_k=64, group_m=8, num_warps=4, num_stages=4)
    return TileConfig(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=8, num_stages=3)


def tile_config_for(num_tokens: int, top_k: int, shape: MoeShape, tuned_dir: Path = TUNED_DIR) -> TileConfig:
    """The tuned entry with M nearest to num_tokens (ties go to the smaller M), else the heuristic.

    Example: with a table keyed {1, 16, 64}, num_tokens=20 picks the M=16 entry, 50 the M=64 one.
    """
    table = load_table(table_path(shape, tuned_dir))
    if not table:
        return default_tile_config(num_tokens, top_k, shape.num_experts)
    _, cfg = min(table, key=lambda entry: (abs(entry[0] - num_tokens), entry[0]))
    return cfg


def device_name(device: torch.device) -> str:
    """The device part of a tuned file name: "NVIDIA_H100_80GB_HBM3", or "cpu" (interpreter)."""
    if device.type != "cuda":
        return device.type
    return torch.cuda.get_device_name(device).replace(" ", "_")
