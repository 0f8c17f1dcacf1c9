"""The measured CPU plans cached on disk (kernels/cpu/dispatch.py): one JSON file per machine and model, so
the second start reads what the first measured. A plan that cannot be read is measured again; a cache that
cannot be written costs a measurement at the next start, nothing else."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

from moe_runtime.kernels.cpu.dispatch import ChunkPlan, CpuPlan, RowPlan

log = logging.getLogger(__name__)

# Bump when the cached JSON's meaning changes, or when a kernel change moves the switch points (2: `dot` on
# AVX512-BF16 CPUs; 3: `dot_int8`, `_apart`; 4: the vdpbf16ps tiles' prefetch into L2, faster from 3 rows,
# and fp8 experts measured in fp8 on their native kernels; 5: the int8 and fp8 tiles' cheaper widening)
FORMAT = 5


def cache_file(cache_dir: str | Path, machine: str, model_key: str) -> Path:
    digest = hashlib.sha256(f"{FORMAT} {machine} {model_key}".encode()).hexdigest()[:16]
    return Path(cache_dir) / f"cpu-plan-{digest}.json"


def load_plan(path: Path) -> CpuPlan | None:
    """The cached plan at `path`, or None when there is none or it does not parse (then it is measured)."""
    try:
        data = json.loads(path.read_text())
        rows = {k: RowPlan(tuple(v["bounds"]), tuple(v["choices"])) for k, v in data["linear"].items()}
        opt = {k: RowPlan(tuple(data[k]["bounds"]), tuple(data[k]["choices"])) if data.get(k) else None
               for k in ("expert", "decode", "dot", "dot_int8", "dot_fp8")}
        chunk = data.get("prefill")  # absent from plans cached before it was measured
        prefill = None if not chunk else ChunkPlan(int(chunk["chunk"]), int(chunk["limit"]), tuple(chunk["sizes"]),
                                                   tuple(float(t) for t in chunk["tokens_per_s"]))
        return CpuPlan(data["machine"], rows, **opt, prefill=prefill)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_plan(plan: CpuPlan, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(plan), indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only cache costs a measurement at the next start, nothing else
        log.warning("could not cache the CPU kernel plan at %s (%s)", path, e.strerror)
