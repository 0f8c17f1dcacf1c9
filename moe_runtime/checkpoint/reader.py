"""Read single tensors of safetensors files straight into caller-owned memory, through the page cache.

Why not `CheckpointFiles.get`: it reads through a shared mmap of the whole file, and every page it touches
stays mapped into the process and counts in its resident set (RssFile) until the file is closed. A store
that streams experts from disk would then grow to the checkpoint's size. `pread` into the destination slot
uses the kernel's page cache, which the process does not own, so resident memory stays bounded by what the
store allocates. The format (8-byte little-endian header length, JSON header, data) is the documented one.
FP8 checkpoints (`checkpoint/fp8.py`): an F8_E4M3 weight is read with its weight_scale, into 8-bit experts
as they are (values and per-row scales) and dequantized into anything else (`read_weight`, `copy_into`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_runtime.checkpoint import fp8
from moe_runtime.checkpoint.layout import SAFETENSORS_DTYPES
from moe_runtime.errors import CheckpointError
from moe_runtime.kernels.quant import QuantizedWeight, quantize_into

# What the reader reads: 16/32-bit tensors, FP8 checkpoints' values (whether an F8 tensor may be there, and
# has its scale, is `CheckpointFiles`' check, made before any reader opens).
_READ_DTYPES = {**SAFETENSORS_DTYPES, fp8.FP8_DTYPE: torch.float8_e4m3fn}


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: file, absolute byte offset, length, dtype and shape."""

    file: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorLocation]:
    """Parse a safetensors header. Raises `CheckpointError` naming the file on a malformed header."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _READ_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name} has dtype {meta['dtype']}; allowed: {sorted(_READ_DTYPES)}"
            )
        start, end = meta["data_offsets"]
        out[name] = TensorLocation(
            str(path), 8 + n + start, end - start, _READ_DTYPES[meta["dtype"]], tuple(meta["shape"])
        )
    return out


class SafetensorsReader:
    """Random access to the named tensors of a checkpoint directory. Owns one fd per file; `close()` them.

    names: tensor name -> file name (relative to `model_dir`), e.g. `CheckpointFiles.location`.
    """

    def __init__(self, model_dir: str | Path, names: dict[str, str]):
        self.dir = Path(model_dir)
        self.locations: dict[str, TensorLocation] = {}
        for fname in sorted(set(names.values())):
            header = read_header(self.dir / fname)
            self.locations.update({n: loc for n, loc in header.items() if names.get(n) == fname})
        files = sorted({loc.file for loc in self.locations.values()})
        self._fds = {f: os.open(f, os.O_RDONLY) for f in files}  # one per file, not per tensor

    def read_into(self, name: str, dst: torch.Tensor) -> int:
        """Copy tensor `name` into `dst` (contiguous, CPU, same numel; converted if the dtype differs).

        Returns the bytes read from the file.
        """
        loc = self.locations[name]
        assert dst.is_contiguous() and dst.device.type == "cpu" and dst.numel() * loc.dtype.itemsize == loc.nbytes
        raw = dst if dst.dtype == loc.dtype else torch.empty(dst.shape, dtype=loc.dtype)
        view = memoryview(raw.reshape(-1).view(torch.uint8).numpy()).cast("B")  # reshape: 0-dim scales too
        done = 0
        while done < loc.nbytes:
            got = os.preadv(self._fds[loc.file], [view[done:]], loc.offset + done)
            if got <= 0:
                raise CheckpointError(f"{loc.file}: truncated while reading tensor {name}")
            done += got
        if raw is not dst:
            dst.copy_(raw)
        return loc.nbytes

    def read_weight(self, name: str, dst: torch.Tensor | QuantizedWeight) -> int:
        """Tensor `name` into an expert's weight: a 16-bit destination gets it converted (FP8 values
        dequantized with their scale); a `QuantizedWeight` destination (rows of quantized experts) gets FP8
        values of its own dtype as they are with their scale broadcast to rows, anything else quantized per
        row (`kernels.quant.quantize_into`). Returns the bytes read (values and scale)."""
        loc = self.locations[name]
        if loc.dtype == torch.float8_e4m3fn:
            scale = self.get(fp8.scale_name(name))
            nbytes = loc.nbytes + self.locations[fp8.scale_name(name)].nbytes
            if isinstance(dst, QuantizedWeight) and dst.dtype == loc.dtype:
                self.copy_into(name, dst.data)  # the checkpoint's own 8 bits
                fp8.check_no_nan(name, dst.data, loc.file)
                dst.scale.copy_(fp8.row_scales(scale, loc.shape[0]))
            elif isinstance(dst, QuantizedWeight):  # FP8 -> int8 (model.quantization: int8)
                quantize_into(fp8.dequantize(self.get(name), scale, torch.float32), dst.data, dst.scale)
            else:
                dst.copy_(fp8.dequantize(self.get(name), scale, dst.dtype))
            return nbytes
        if isinstance(dst, QuantizedWeight):
            quantize_into(self.get(name), dst.data, dst.scale)
            if dst.dtype == torch.float8_e4m3fn:  # NaN in, NaN bytes out
                fp8.check_no_nan(name, dst.data, loc.file)
            return loc.nbytes
        return self.read_into(name, dst)

    def copy_into(self, name: str, dst: torch.Tensor) -> None:
        """Copy tensor `name` into `dst` wherever it lives: straight from the file into contiguous CPU memory
        (no staging copy), else through a CPU tensor of the stored dtype. An FP8 weight read into a wider
        dtype is dequantized with its weight_scale (the dense layers of an FP8 checkpoint)."""
        if self.locations[name].dtype == torch.float8_e4m3fn and dst.dtype != torch.float8_e4m3fn:
            dst.copy_(fp8.dequantize(self.get(name), self.get(fp8.scale_name(name)), dst.dtype))
        elif dst.device.type == "cpu" and dst.is_contiguous():
            self.read_into(name, dst)
        else:
            dst.copy_(self.get(name))

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name` in a new CPU tensor of its stored dtype and shape."""
        loc = self.locations[name]
        out = torch.empty(loc.shape, dtype=loc.dtype)
        self.read_into(name, out)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
