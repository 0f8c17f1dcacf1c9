"""The quantized spill file: every routed expert of a 16-bit checkpoint quantized once, read back in 8 bits.

The `mmap` host tier (offload/host_tier.py) keeps no expert in memory: it reads one from storage at each
miss. With quantized experts (`model.quantization: int8 | fp8`) and a 16-bit checkpoint it would read the
16-bit tensors and quantize them every time: twice the bytes the slot receives, through a page cache that
then holds the 16-bit checkpoint. The spill file holds each expert already quantized, so a miss reads half
the bytes (values and row scales), straight into the slot with `pread` (no mapping: read pages do not stay
counted in the process's RSS), and nothing is quantized after start-up.

It is built at the first start with a given checkpoint and scheme (every expert read and quantized once:
`kernels.quant.quantize_into`, the same bits the tier produced per read) into `offload.spill_dir`, written
to a temporary name and renamed when complete, and reused by later starts. Its name is a digest of the
checkpoint files (name, size, mtime) and the experts' shapes and scheme, so a changed checkpoint builds a
new one (old ones are left for the user to delete: `moe-runtime` never deletes files it did not just
write). Where the directory cannot be written or lacks the space, the tier quantizes at each read as before
and logs why once.

Layout: one record per (sparse layer, expert), in layer then expert order, each
    w13 values [2I, D] | w2 values [D, I] | w13 scales [2I] fp32 | w2 scales [D] fp32
(values one byte each: int8 or float8_e4m3fn), at offset record_index x record_bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

from moe_runtime.checkpoint.layout import layout_of
from moe_runtime.checkpoint.reader import SafetensorsReader
from moe_runtime.config import ModelConfig
from moe_runtime.kernels.quant import SCHEMES, QuantizedWeight, new_weight

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the file layout changes: another digest, another file
DEFAULT_DIR = Path.home() / ".cache" / "moe-runtime" / "quantized-experts"
FREE_MARGIN = 1 << 30  # leave at least this much free on the spill directory's disk


class QuantizedSpill:
    """An open spill file of `cfg`'s routed experts in `scheme` (see the module docstring)."""

    def __init__(self, path: Path, cfg: ModelConfig, scheme: str):
        self.path, self.scheme = path, scheme
        E, D, I = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size  # noqa: E741
        self.E, self.D, self.I = E, D, I
        self.index = {layer: i for i, layer in enumerate(cfg.moe_layers)}  # sparse layer -> record row
        self.record_bytes = spill_record_bytes(D, I)
        self._fd = os.open(path, os.O_RDONLY)

    def read_expert(self, layer: int, expert: int, w13: QuantizedWeight, w2: QuantizedWeight) -> int:
        """Read one expert into w13 ([2I, D] values, [2I] scales) and w2 ([D, I], [D]): contiguous CPU
        tensors of this file's scheme. Returns the bytes read."""
        offset = (self.index[layer] * self.E + expert) * self.record_bytes
        for dst in (w13.data, w2.data, w13.scale, w2.scale):
            offset += self._read_into(dst, offset)
        return self.record_bytes

    def _read_into(self, dst: torch.Tensor, offset: int) -> int:
        assert dst.is_contiguous() and dst.device.type == "cpu"
        n = dst.numel() * dst.element_size()
        view = memoryview(dst.reshape(-1).view(torch.uint8).numpy()).cast("B")
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got <= 0:
                raise OSError(f"{self.path}: truncated at byte {offset + done} (want {offset + n})")
            done += got
        return n

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def spill_record_bytes(D: int, I: int) -> int:  # noqa: E741
    """Bytes of one expert's record: 3 x I x D one-byte values and 2I + D fp32 scales."""
    return 3 * I * D + 4 * (2 * I + D)


def spill_path(spill_dir: Path, reader: SafetensorsReader, cfg: ModelConfig, scheme: str) -> Path:
    """Where the spill of this checkpoint's experts in `scheme` lives: a digest of the files the experts are
    read from (name, size, mtime), the shapes and the scheme."""
    h = hashlib.sha256(f"{FORMAT} {scheme} D{cfg.hidden_size} I{cfg.intermediate_size} "
                       f"E{cfg.num_local_experts} layers{list(cfg.moe_layers)}".encode())
    for file in sorted({loc.file for loc in reader.locations.values()}):
        st = os.stat(file)
        h.update(f" {Path(file).name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return Path(spill_dir) / f"experts-{scheme}-{h.hexdigest()[:20]}.bin"


def open_spill(reader: SafetensorsReader, cfg: ModelConfig, scheme: str,
               spill_dir: str | Path | None = None) -> QuantizedSpill | None:
    """The spill file of `reader`'s experts in `scheme`, built now if there is none yet (every expert read
    once and quantized). None where it cannot be (the directory is not writable, the disk lacks room):
    the caller quantizes at each read then. `scheme` must be a key of `kernels.quant.SCHEMES`."""
    assert scheme in SCHEMES, scheme
    spill_dir = Path(spill_dir) if spill_dir is not None else DEFAULT_DIR
    path = spill_path(spill_dir, reader, cfg, scheme)
    if not path.exists():
        size = len(cfg.moe_layers) * cfg.num_local_experts * spill_record_bytes(cfg.hidden_size, cfg.intermediate_size)
        try:
            spill_dir.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(spill_dir).free
            if free < size + FREE_MARGIN:
                log.warning("offload: no quantized spill file (%s needs %.1f GB, %.1f GB free there); each miss "
                            "quantizes the 16-bit expert it reads", spill_dir, size / 1e9, free / 1e9)
                return None
            _build(path, reader, cfg, scheme)
        except OSError as e:
            log.warning("offload: no quantized spill file in %s (%s); each miss quantizes the 16-bit expert it "
                        "reads", spill_dir, e.strerror or e)
            return None
    return QuantizedSpill(path, cfg, scheme)


def _build(path: Path, reader: SafetensorsReader, cfg: ModelConfig, scheme: str) -> None:
    """Write every expert quantized to `path` (through a temporary file renamed when complete)."""
    layout, D, I = layout_of(cfg), cfg.hidden_size, cfg.intermediate_size  # noqa: E741
    w13, w2 = new_weight((2 * I, D), torch.float32, scheme), new_weight((D, I), torch.float32, scheme)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    log.info("offload: quantizing every expert once to %s (%s)", path, scheme)
    try:
        with open(tmp, "wb") as f:
            for layer in cfg.moe_layers:
                for e in range(cfg.num_local_experts):
                    layout.read_expert(reader.read_weight, layer, e, w13, w2)  # quantized per row
                    for t in (w13.data, w2.data, w13.scale, w2.scale):
                        f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
