"""The tables bench/moe_kernels.py prints: one row per (shape, M) with every method's time and ours' rates, and
the quantized experts beside the 16-bit kernel (speedup, % of the roofline of the bytes they move)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    shape: str
    dtype: str  # activations
    weights: str  # the experts' format: dtype for 16-bit weights, else a QuantFormat's label
    M: int
    times_ms: dict[str, float]  # method -> time
    flops: float
    bytes: float


def format_table(rows: list[Row], peak_bw: float | None) -> str:
    """One row per (shape, M): every method's time, each baseline's time over ours in the same mode (a
    "_graph" baseline over ours_graph), then ours' TFLOP/s, GB/s and % of the HBM roofline (eager, and
    under a CUDA graph when measured)."""
    methods = list(dict.fromkeys(m for r in rows for m in r.times_ms))  # every method, first-seen order
    ours_modes = [m for m in ("ours", "ours_graph") if m in methods]
    baselines = [m for m in methods if m not in ours_modes]

    def ours_of(method: str) -> str:
        return "ours_graph" if method.endswith("_graph") and "ours_graph" in methods else "ours"

    head = ["shape", "dtype", "weights", "M", *[f"{m} ms" for m in methods],
            *[f"{m} / {ours_of(m)}" for m in baselines], "ours TFLOP/s", "ours GB/s",
            *[f"% HBM roofline ({'graph' if m == 'ours_graph' else 'eager'})" for m in ours_modes]]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        t = r.times_ms
        if not any(m in t for m in ours_modes):
            continue  # a weight format this device cannot run (said when skipped)
        ours_s = min(t[m] for m in ours_modes if m in t) / 1e3  # the better mode, for the throughput cells
        cells = [r.shape, r.dtype, r.weights, str(r.M)]
        cells += [f"{t[m]:.3f}" if m in t else "-" for m in methods]
        cells += [f"{t[m] / t[ours_of(m)]:.2f}x" if m in t and ours_of(m) in t else "-" for m in baselines]
        cells += [f"{r.flops / ours_s / 1e12:.3f}", f"{r.bytes / ours_s / 1e9:.1f}"]
        cells += [
            f"{100 * r.bytes / peak_bw / (t[m] / 1e3):.0f}%" if peak_bw and m in t else "-"
            for m in ours_modes
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def best_mode(row: Row, other: Row | None = None) -> str | None:
    """"ours_graph" when measured for row (and other), else "ours"; None when neither was measured."""
    for mode in ("ours_graph", "ours"):
        if mode in row.times_ms and (other is None or mode in other.times_ms):
            return mode
    return None


def format_quant_table(rows: list[Row], peak_bw: float | None) -> str:
    """Quantized experts beside the 16-bit kernel, per (shape, M): each format's time in the same mode as
    the 16-bit one (graph replays on CUDA), the 16-bit time over it, and % of the roofline of the bytes it
    moves (8-bit values + scales of the active experts + activations). "" without quantized rows."""
    schemes = list(dict.fromkeys(r.weights for r in rows if r.weights != r.dtype))  # quantized rows' labels
    if not schemes:
        return ""
    by_key = {(r.shape, r.M, r.weights): r for r in rows}
    head = ["shape", "M", "16-bit ms"]
    for q in schemes:
        head += [f"{q} ms", f"{q} speedup", f"{q} % roofline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.weights != r.dtype or not any((r.shape, r.M, q) in by_key for q in schemes):
            continue
        base_mode = best_mode(r)
        cells = [r.shape, str(r.M), f"{r.times_ms[base_mode]:.3f} ({base_mode})" if base_mode else "-"]
        for q in schemes:
            qr = by_key.get((r.shape, r.M, q))
            mode = best_mode(qr, r) if qr else None
            if mode is None:
                cells += ["-", "-", "-"]
                continue
            t = qr.times_ms[mode]
            roof = f"{100 * qr.bytes / peak_bw / (t / 1e3):.0f}%" if peak_bw else "-"
            cells += [f"{t:.3f}", f"{r.times_ms[mode] / t:.2f}x", roof]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
