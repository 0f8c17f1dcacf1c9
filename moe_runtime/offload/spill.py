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
new one. Beside each file a record (`<name>.json`) names the checkpoint files it was built from with their
size and mtime: `moe-runtime cache` lists the spill files with their checkpoint and whether they are still
current, and `moe-runtime cache prune` deletes those no start would read again (a changed or removed
checkpoint, an older format, a build that was interrupted); the engine itself never deletes a file it did
not just write. Where the directory cannot be written or lacks the space, the tier quantizes at each read
as before and logs why once.

Layout: one record per (sparse layer, expert), in layer then expert order, each
    w13 values [2I, D] | w2 values [D, I] | w13 scales [2I] fp32 | w2 scales [D] fp32
(values one byte each: int8 or float8_e4m3fn), at offset record_index x record_bytes.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, replace
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
    for file, (size, mtime_ns) in _sources(reader).items():
        h.update(f" {Path(file).name}:{size}:{mtime_ns}".encode())
    return Path(spill_dir) / f"experts-{scheme}-{h.hexdigest()[:20]}.bin"


def _sources(reader: SafetensorsReader) -> dict[str, tuple[int, int]]:
    """The checkpoint files the experts are read from: absolute path -> (size, mtime in ns), sorted."""
    files = sorted({str(Path(loc.file).resolve()) for loc in reader.locations.values()})
    return {f: (os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files}


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
    _write_record(path, reader, scheme)


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _write_record(path: Path, reader: SafetensorsReader, scheme: str) -> None:
    """The spill file's origin beside it (module docstring); without it the file still serves, and
    `moe-runtime cache` lists it as unrecorded."""
    record = {"format": FORMAT, "scheme": scheme, "checkpoint": str(reader.dir.resolve()),
              "files": {f: list(st) for f, st in _sources(reader).items()}}
    tmp = _record_path(path).with_name(f"{_record_path(path).name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(_record_path(path))
    except OSError as e:
        log.warning("offload: could not record where %s comes from (%s)", path, e.strerror or e)
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------
# What is in a spill directory (`moe-runtime cache`)
# ---------------------------------------------------------------------------------------------------------
class SpillState(enum.Enum):
    CURRENT = "current"  # its checkpoint files are as they were when it was built: a start reads it
    STALE = "stale"  # its checkpoint changed or is gone, or an older format: no start reads it again
    PARTIAL = "partial"  # an interrupted build's temporary file (its process is gone)
    BUILDING = "building"  # a build in progress (its process is alive)
    UNRECORDED = "unrecorded"  # no record of its origin (built before records were kept)


PRUNED = (SpillState.STALE, SpillState.PARTIAL)  # what `prune` deletes; `prune --all` also CURRENT, UNRECORDED


@dataclass(frozen=True)
class SpillFile:
    path: Path
    nbytes: int  # on disk, with its record
    state: SpillState
    why: str  # the state's reason, one phrase ("" for current)
    scheme: str = ""  # int8 | fp8, from the record ("" where there is none)
    checkpoint: str = ""  # the checkpoint directory it was built from, from the record


def list_spills(spill_dir: str | Path | None = None) -> list[SpillFile]:
    """Every spill file (and interrupted build) in `spill_dir` (default: DEFAULT_DIR), by name."""
    spill_dir = Path(spill_dir) if spill_dir is not None else DEFAULT_DIR
    if not spill_dir.is_dir():
        return []
    out = []
    for path in sorted(spill_dir.iterdir()):
        if path.name.startswith("experts-") and path.name.endswith(".tmp"):
            pid = path.name.rsplit(".", 2)[-2]
            alive = pid.isdigit() and _alive(int(pid))
            out.append(SpillFile(path, _size(path), SpillState.BUILDING if alive else SpillState.PARTIAL,
                                 f"process {pid} " + ("is writing it" if alive else "is gone")))
        elif path.name.startswith("experts-") and path.suffix == ".bin":
            out.append(_judge(path))
    return out


def _judge(path: Path) -> SpillFile:
    nbytes = _size(path) + _size(_record_path(path))
    try:
        record = json.loads(_record_path(path).read_text())
        scheme, checkpoint, files = str(record["scheme"]), str(record["checkpoint"]), dict(record["files"])
        fmt = int(record["format"])
    except (OSError, ValueError, KeyError, TypeError):
        return SpillFile(path, nbytes, SpillState.UNRECORDED, "no record of the checkpoint it was built from")
    stale = SpillFile(path, nbytes, SpillState.STALE, "", scheme, checkpoint)
    if fmt != FORMAT:
        return replace(stale, why=f"format {fmt}, this moe-runtime writes {FORMAT}")
    for file, (size, mtime_ns) in files.items():
        try:
            st = os.stat(file)
        except OSError:
            return replace(stale, why=f"{file} is gone")
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            return replace(stale, why=f"{file} changed since")
    return SpillFile(path, nbytes, SpillState.CURRENT, "", scheme, checkpoint)


def prune(files: list[SpillFile], states: tuple[SpillState, ...] = PRUNED) -> list[SpillFile]:
    """Delete the listed files in `states` (never one being built), with their records; returns those."""
    gone = []
    for f in files:
        if f.state in states and f.state is not SpillState.BUILDING:
            f.path.unlink(missing_ok=True)
            _record_path(f.path).unlink(missing_ok=True)
            gone.append(f)
    return gone


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
