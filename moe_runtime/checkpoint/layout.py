"""How Hugging Face checkpoints of each supported family lay out their tensors, and how the runtime stacks them:
the one home of these facts (hub tensor names, the expert stacking, bytes per expert and per rank, dtype
spellings).

Every family names most tensors alike: `model.embed_tokens`, `model.norm`, `lm_head`, and under
`model.layers.{l}.` the two norms, `self_attn.{q,k,v,o}_proj` (with `.bias` where the config says so).
They differ in a few places, which a `CheckpointLayout` records (`LAYOUTS`, by architecture):
  - the sparse block: `block_sparse_moe` (Mixtral) or `mlp`, holding the router `gate` and the routed
    experts `experts.{e}.` (Mixtral's w1 gate [I, D], w3 up [I, D], w2 down [D, I]; the others' gate_proj,
    up_proj, down_proj);
  - q/k norms: none, one [Dh] weight each (Qwen3-MoE), or [H Dh] and [KVH Dh] (OLMoE);
  - from the config: a shared expert `mlp.shared_expert.{gate,up,down}_proj` and `mlp.shared_expert_gate`
    [1, D] (Qwen2-MoE), and dense layers `mlp.{gate,up,down}_proj` (Qwen's `cfg.dense_layers`).
The runtime stacks each sparse layer's experts as w13 [E, 2I, D] (gate rows, then up rows: one GEMM computes
both) and w2 [E, D, I]; each layer's q, k and v projections (and biases) as one [(H + 2 KVH) Dh, D] weight
(q rows, then k, then v: `qkv_rows`); a dense SwiGLU's gate and up projections as one [2I, D] weight.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

import torch

from moe_runtime.config import ModelConfig
from moe_runtime.errors import ConfigError

T = TypeVar("T")

# L layers, E experts, D hidden, I intermediate, V vocab, H query heads, KVH key/value heads, Dh head dim

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Buffers some exporters save that carry no information (recomputed from the config).
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")

# config.json's and the YAML's dtype names -> torch dtypes.
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors header dtype codes -> torch dtypes (the ones a checkpoint of these DTYPES holds).
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class ExpertNames(NamedTuple):
    """Hub names of one routed expert's three matrices."""

    gate: str  # gate projection [I, D]: rows 0..I-1 of the stacked w13
    up: str  # up projection [I, D]: rows I..2I-1 of w13
    down: str  # down projection [D, I]: w2


@dataclass(frozen=True)
class CheckpointLayout:
    """What one family's checkpoints name differently (module docstring)."""

    moe: str  # the sparse block's module under model.layers.{l}
    expert: ExpertNames  # one routed expert's matrix names, without prefix or ".weight"
    qk_norm: Literal["none", "head", "projection"]  # q_norm/k_norm weights: none, [Dh], or [H Dh] / [KVH Dh]

    def expert_names(self, layer: int, expert: int) -> ExpertNames:
        """Example:
        >>> MIXTRAL.expert_names(3, 7).gate
        'model.layers.3.block_sparse_moe.experts.7.w1.weight'
        >>> QWEN3_MOE.expert_names(3, 7).down
        'model.layers.3.mlp.experts.7.down_proj.weight'
        """
        p = f"model.layers.{layer}.{self.moe}.experts.{expert}."
        return ExpertNames(*(p + m + ".weight" for m in self.expert))

    def is_expert_tensor(self, name: str) -> bool:
        """Whether a hub name is one of the routed experts' matrices (not a shared expert's)."""
        return f".{self.moe}.experts." in name

    def read_expert(self, read_into: Callable[[str, torch.Tensor], T], layer: int, expert: int,
                    w13: torch.Tensor, w2: torch.Tensor) -> list[T]:
        """Fill one expert's stacked weights through `read_into(hub name, destination)`: w13 [2I, D] gets the
        gate projection in its first I rows and the up projection in the rest, w2 [D, I] the down
        projection. Returns what the three calls returned."""
        names = self.expert_names(layer, expert)
        inter = w13.shape[0] // 2
        return [
            read_into(names.gate, w13[:inter]),  # gate rows
            read_into(names.up, w13[inter:]),  # up rows
            read_into(names.down, w2),
        ]

    def expected_tensors(self, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
        """Hub tensor name -> shape for a checkpoint of this family with this config, in a fixed order (the
        seeded presets draw their weights in it)."""
        D, I, V, Dh = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
        H, KVH, E = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_local_experts
        shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (V, D)
        qk_norms = {"none": {}, "head": {"q_norm": (Dh,), "k_norm": (Dh,)},
                    "projection": {"q_norm": (H * Dh,), "k_norm": (KVH * Dh,)}}[self.qk_norm]
        for l in range(cfg.num_hidden_layers):
            p = f"model.layers.{l}."
            shapes[p + "input_layernorm.weight"] = (D,)
            shapes[p + "post_attention_layernorm.weight"] = (D,)
            for proj, rows in qkv_rows(cfg).items():
                shapes[f"{p}self_attn.{proj}.weight"] = (rows.stop - rows.start, D)
            shapes[p + "self_attn.o_proj.weight"] = (D, H * Dh)
            for proj, rows in qkv_rows(cfg).items() if cfg.qkv_bias else ():
                shapes[f"{p}self_attn.{proj}.bias"] = (rows.stop - rows.start,)
            if cfg.o_bias:
                shapes[p + "self_attn.o_proj.bias"] = (D,)
            for norm, shape in qk_norms.items():
                shapes[f"{p}self_attn.{norm}.weight"] = shape
            if l in cfg.dense_layers:
                shapes.update(_swiglu(p + "mlp.", D, cfg.dense_intermediate_size))
                continue
            shapes[f"{p}{self.moe}.gate.weight"] = (E, D)
            if cfg.shared_expert_intermediate_size is not None:
                shapes.update(_swiglu(f"{p}{self.moe}.shared_expert.", D, cfg.shared_expert_intermediate_size))
                shapes[f"{p}{self.moe}.shared_expert_gate.weight"] = (1, D)
            for e in range(E):
                names = self.expert_names(l, e)
                shapes[names.gate] = (I, D)
                shapes[names.down] = (D, I)
                shapes[names.up] = (I, D)
        return shapes

    def runtime_location(self, cfg: ModelConfig, name: str) -> tuple[str, slice | None]:
        """Where a hub tensor other than a routed expert's goes in the runtime model: (the parameter's name in
        `model.named_parameters()`, the rows of it the tensor fills, or None for all of it).

        >>> cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        ...     num_attention_heads=4, num_key_value_heads=2, head_dim=2, num_local_experts=2,
        ...     num_experts_per_tok=1, rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=64)
        >>> MIXTRAL.runtime_location(cfg, "model.layers.0.self_attn.k_proj.weight")
        ('layers.0.self_attn.qkv_proj.weight', slice(8, 12, None))
        >>> MIXTRAL.runtime_location(cfg, "lm_head.weight")
        ('lm_head.weight', None)
        """
        param = name.removeprefix("model.")
        if m := re.fullmatch(r"(.*\.self_attn\.)([qkv]_proj)\.(weight|bias)", param):
            return f"{m[1]}qkv_proj.{m[3]}", qkv_rows(cfg)[m[2]]
        if m := re.fullmatch(r"(.*\.)(gate|up)_proj\.weight", param):  # a dense MLP's or the shared expert's
            shared = f".{self.moe}.shared_expert." in name
            inter = cfg.shared_expert_intermediate_size if shared else cfg.dense_intermediate_size
            return f"{m[1]}gate_up_proj.weight", slice(0, inter) if m[2] == "gate" else slice(inter, 2 * inter)
        return param, None


def _swiglu(prefix: str, D: int, inter: int) -> dict[str, tuple[int, int]]:
    """A dense SwiGLU's three matrices under `prefix`."""
    return {prefix + "gate_proj.weight": (inter, D), prefix + "up_proj.weight": (inter, D),
            prefix + "down_proj.weight": (D, inter)}


MIXTRAL = CheckpointLayout(moe="block_sparse_moe", expert=ExpertNames("w1", "w3", "w2"), qk_norm="none")
_QWEN_EXPERT = ExpertNames("gate_proj", "up_proj", "down_proj")
QWEN2_MOE = CheckpointLayout(moe="mlp", expert=_QWEN_EXPERT, qk_norm="none")
QWEN3_MOE = CheckpointLayout(moe="mlp", expert=_QWEN_EXPERT, qk_norm="head")
OLMOE = CheckpointLayout(moe="mlp", expert=_QWEN_EXPERT, qk_norm="projection")

# Architecture (config.json's `architectures`) -> its layout; model/registry.py pairs the same keys with the
# model classes.
LAYOUTS: dict[str, CheckpointLayout] = {
    "MixtralForCausalLM": MIXTRAL,
    "Qwen2MoeForCausalLM": QWEN2_MOE,
    "Qwen3MoeForCausalLM": QWEN3_MOE,
    "OlmoeForCausalLM": OLMOE,
}


def layout_of(cfg: ModelConfig) -> CheckpointLayout:
    return LAYOUTS[cfg.architecture]


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hub tensor name -> shape for a checkpoint with this config (its family's layout)."""
    return layout_of(cfg).expected_tensors(cfg)


def qkv_rows(cfg: ModelConfig) -> dict[str, slice]:
    """Where each attention projection's rows sit in the stacked q/k/v weight (and bias).

    >>> cfg = ModelConfig.from_hf({"architectures": ["MixtralForCausalLM"], "vocab_size": 8, "hidden_size": 8,
    ...     "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
    ...     "num_local_experts": 2, "num_experts_per_tok": 1})
    >>> qkv_rows(cfg)
    {'q_proj': slice(0, 8, None), 'k_proj': slice(8, 12, None), 'v_proj': slice(12, 16, None)}
    """
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}


def resolve_dtype(dtype: str, cfg: ModelConfig) -> torch.dtype:
    """The torch dtype `model.dtype` names ("auto": the checkpoint's own `torch_dtype`)."""
    if dtype == "auto":
        return DTYPES[cfg.torch_dtype]
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; allowed: ['auto', {', '.join(map(repr, DTYPES))}]")
    return DTYPES[dtype]


def dtype_bytes(cfg: ModelConfig, dtype: str | torch.dtype) -> int:
    """Bytes per weight element in `dtype` (a torch dtype, or a name: "auto" is the checkpoint's)."""
    return (dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, cfg)).itemsize


def expert_bytes(cfg: ModelConfig, dtype: str | torch.dtype, quantization: str = "none") -> int:
    """Bytes of one routed expert's weights: gate and up [I, D] plus down [D, I]; with `quantization` (int8,
    fp8: `model.quantization`) one byte per weight plus an fp32 scale per row."""
    from moe_runtime.kernels.quant import expert_nbytes

    torch_dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, cfg)
    return expert_nbytes(cfg.hidden_size, cfg.intermediate_size, torch_dtype, quantization)


def shared_bytes(cfg: ModelConfig, dtype: str | torch.dtype) -> int:
    """Bytes of the weights every rank replicates: everything but the routed experts (embeddings, attention,
    norms, routers, shared experts, dense layers' MLPs, lm_head)."""
    layout = layout_of(cfg)
    shapes = layout.expected_tensors(cfg)
    elements = sum(math.prod(shape) for name, shape in shapes.items() if not layout.is_expert_tensor(name))
    return elements * dtype_bytes(cfg, dtype)
