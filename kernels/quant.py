"""Quantized expert weights: 8-bit values with one fp32 scale per output channel, and how to make them.

    QuantizedWeight(data[S, N, K] int8 | float8_e4m3fn, scale[S, N] float32)
        w[s, n, k] ~= data[s, n, k] * scale[s, n]    (symmetric: no zero point)
    quantize(w[S, N, K] 16/32-bit, scheme) -> QuantizedWeight        scheme: "int8" | "fp8"
    QuantizedWeight.dequantize(dtype) -> [S, N, K] in dtype              (the reference's weights)
    QuantizedActivations(data[M, K] float8_e4m3fn, scale[M] float32)      (w8a8: one scale per token)

A `QuantizedWeight` goes where a 16-bit w13 [S, 2I, H] or w2 [S, H, I] goes: every MoE backend takes either
(`kernels.fused_moe`), so the model and the expert store pass weights without knowing their format. One
scale per output channel (a row of w13 or w2) multiplies out of the K sum, so a kernel can accumulate
data x activations in fp32 and scale each output column once, after the loop (llama.cpp's q8_0 scales every
32 weights instead; per row is what vLLM's w8a16 and llm-compressor's FP8 channel-wise schemes use, and
costs 4 bytes per row: 0.1% of a Mixtral expert's int8 bytes).

int8: scale = max|w[n, :]| / 127, data = round(w / scale) in [-127, 127] (never -128: symmetric).
fp8 (OCP e4m3, finite max 448): scale = max|w[n, :]| / 448, data = (w / scale) rounded to e4m3 by torch.
Per-tensor FP8 scales (as some checkpoints carry) are stored expanded to one per row: same values.
Rows of zeros get scale 1 (data 0), so no division by zero and the row stays exactly zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# scheme name (`model.quantization`) -> storage dtype of the quantized values
SCHEMES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
# the largest magnitude each storage dtype holds: a row's absmax maps onto it
QMAX: dict[torch.dtype, float] = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


@dataclass(frozen=True)
class QuantizedWeight:
    """A stack of S weight matrices [N, K] in 8 bits with a per-row fp32 scale (module docstring).

    data:  [S, N, K] int8 or float8_e4m3fn, unit stride along K
    scale: [S, N] float32

    Indexing the slot dimension gives one expert's [N, K] matrix with its [N] scales, so code written for a
    stacked 16-bit tensor (`w13[s]`, `w13.shape`) runs unchanged:
        >>> q = quantize(torch.tensor([[[1.0, -2.0], [0.0, 0.0]]]), "int8")
        >>> q.data.tolist(), q.scale.tolist()
        ([[[64, -127], [0, 0]]], [[0.015748031437397003, 1.0]])
        >>> q[0].dequantize(torch.float32).tolist()  # 64 * 2/127 = 1.0079: the rounding error of 8 bits
        [[1.0078740119934082, -2.0], [0.0, 0.0]]
    """

    data: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self):
        if self.data.dtype not in QMAX:
            raise ValueError(f"quantized data must be int8 or float8_e4m3fn, got {self.data.dtype}")
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != tuple(self.data.shape[:-1]):
            raise ValueError(f"scale must be float32 {tuple(self.data.shape[:-1])} (one per row of data "
                             f"{tuple(self.data.shape)}), got {self.scale.dtype} {tuple(self.scale.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        """The storage dtype of the values (int8 or float8_e4m3fn)."""
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def __getitem__(self, index) -> QuantizedWeight:
        return QuantizedWeight(self.data[index], self.scale[index])

    def nbytes(self) -> int:
        """Bytes of the values and the scales."""
        return self.data.numel() * self.data.element_size() + self.scale.numel() * 4

    def copy_(self, src: QuantizedWeight, non_blocking: bool = False) -> QuantizedWeight:
        """Copy another QuantizedWeight of the same shape and dtype into this one (values and scales)."""
        self.data.copy_(src.data, non_blocking=non_blocking)
        self.scale.copy_(src.scale, non_blocking=non_blocking)
        return self

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """data * scale computed in fp32, rounded once to `dtype`: the weights the quantized model computes
        with, by definition (`reference.fused_moe_reference_fp32` on these is the quantized MoE's oracle)."""
        return (self.data.float() * self.scale.unsqueeze(-1)).to(dtype)


# Rows of activations whose max |x| is below this quantize to zeros (w8a8): 448 / max would overflow fp32
# near 2^-120, and such a row is zero next to any weight it meets.
MIN_ACT_AMAX = 2.0**-110


@dataclass(frozen=True)
class QuantizedActivations:
    """Rows of activations in float8_e4m3fn with one fp32 scale per row (per token): the fp8 operand of the
    w8a8 grouped GEMMs, made by `kernels.triton.quant_act.quantize_activations` and its torch twin
    `reference.quantize_activations_reference`.

    data:       [M, K] float8_e4m3fn
    scale:      [M] float32, max_k |x[m, k]| / 448; 0 for a row of zeros (its data is 0: no NaN anywhere)
    orig_dtype: the dtype the rows were quantized from (fp32 / fp16 / bf16); a GEMM returns results in it

        x[m, k] ~= data[m, k] * scale[m]
    e4m3 keeps 3 mantissa bits: the error is at most 2^-4 of |x| where |x| >= 2^-6 * scale[m], and at most
    2^-10 * scale[m] below (e4m3's subnormals).
    """

    data: torch.Tensor
    scale: torch.Tensor
    orig_dtype: torch.dtype

    def __post_init__(self):
        if self.data.dtype != torch.float8_e4m3fn or self.data.dim() != 2:
            raise ValueError(f"activation data must be float8_e4m3fn [M, K], got {self.data.dtype} "
                             f"{tuple(self.data.shape)}")
        if self.scale.dtype != torch.float32 or tuple(self.scale.shape) != tuple(self.data.shape[:1]):
            raise ValueError(f"activation scale must be float32 [{self.data.shape[0]}] (one per row), got "
                             f"{self.scale.dtype} {tuple(self.scale.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def device(self) -> torch.device:
        return self.data.device

    def dequantize(self) -> torch.Tensor:
        """data * scale in fp32, [M, K]: the activations a w8a8 GEMM multiplies, by definition."""
        return self.data.float() * self.scale.unsqueeze(-1)


def is_quantized(w: object) -> bool:
    return isinstance(w, QuantizedWeight)


def keep_dtypes(module: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Give the named parameters of `module` back their dtypes after a `module.to(dtype)` / `_apply`.

    `model.to(bfloat16)` casts every floating-point parameter: fp32 scales would become bf16 (a systematic
    error of up to 0.4% per row) and float8 values would be widened. int8 values are not floating point to
    torch and are never cast. Called by the `_apply` of modules that hold 8-bit weights.
    """
    for name, dtype in dtypes.items():
        p = getattr(module, name)
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


@torch.no_grad()
def quantize_into(w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize w [..., N, K] (any float dtype) per row into caller-owned data (int8 or float8_e4m3fn, the
    same shape) and scale [..., N] float32. The loader uses it to fill an expert slot in place. On CPU
    tensors the native kernels do it in one pass (kernels/cpu/quant.cpp, the same bits); `quantize_into_torch`
    is the definition."""
    from moe_runtime.kernels import cpu

    if not cpu.quantize_into(w, data, scale):
        quantize_into_torch(w, data, scale)


def quantize_into_torch(w: torch.Tensor, data: torch.Tensor, scale: torch.Tensor) -> None:
    """`quantize_into` in torch's ops: per row, scale = amax |w| / qmax (1 for a zero row), data = w / scale
    rounded to nearest-even (int8) or to e4m3, clamped to +-qmax."""
    qmax = QMAX[data.dtype]
    wf = w.to(device=data.device, dtype=torch.float32)
    absmax = wf.abs().amax(dim=-1)  # [..., N]
    s = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    scaled = wf / s.unsqueeze(-1)
    if data.dtype == torch.int8:
        data.copy_(scaled.round_().clamp_(-qmax, qmax))
    else:
        data.copy_(scaled.clamp_(-qmax, qmax))  # torch rounds to nearest e4m3
    scale.copy_(s)


def new_weight(shape: tuple[int, ...], dtype: torch.dtype, scheme: str = "none", *, device=None,
               pin_memory: bool = False, zeros: bool = False) -> torch.Tensor | QuantizedWeight:
    """Storage for a weight stack of `shape` (..., N, K): a `dtype` tensor when `scheme` is "none", else a
    QuantizedWeight (8-bit values, fp32 scales [..., N]). Uninitialized unless `zeros`. The offload store's
    slots and host tier hold experts in whichever format the model runs."""
    make = torch.zeros if zeros else torch.empty
    if scheme == "none":
        return make(shape, dtype=dtype, device=device, pin_memory=pin_memory)
    return QuantizedWeight(make(shape, dtype=SCHEMES[scheme], device=device, pin_memory=pin_memory),
                           make(shape[:-1], dtype=torch.float32, device=device, pin_memory=pin_memory))


def weight_bytes(w: torch.Tensor | QuantizedWeight) -> int:
    """Bytes a weight occupies (and moves): values and, for a QuantizedWeight, its scales."""
    return w.nbytes() if isinstance(w, QuantizedWeight) else w.numel() * w.element_size()


def expert_nbytes(hidden: int, inter: int, dtype: torch.dtype, scheme: str = "none") -> int:
    """Bytes of one routed expert (w13 [2I, D] and w2 [D, I]) in `dtype`, or in `scheme` with its scales.

    >>> expert_nbytes(1024, 3584, torch.bfloat16), expert_nbytes(1024, 3584, torch.bfloat16, "int8")
    (22020096, 11042816)
    """
    if scheme == "none":
        return 3 * hidden * inter * dtype.itemsize
    return 3 * hidden * inter * SCHEMES[scheme].itemsize + 4 * (2 * inter + hidden)


def quantize(w: torch.Tensor, scheme: str) -> QuantizedWeight:
    """w [..., N, K] -> QuantizedWeight with per-row scales. scheme: a key of SCHEMES."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantization={scheme!r} is not supported; allowed: {list(SCHEMES)}")
    data = torch.empty(w.shape, dtype=SCHEMES[scheme], device=w.device)
    scale = torch.empty(w.shape[:-1], dtype=torch.float32, device=w.device)
    quantize_into(w, data, scale)
    return QuantizedWeight(data, scale)
