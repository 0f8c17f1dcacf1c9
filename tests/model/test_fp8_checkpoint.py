"""FP8 checkpoints (config.json `quantization_config.quant_method: "fp8"`, checkpoint/fp8.py), built here from
the `tiny` preset the way vLLM / AutoFP8 write them: every linear layer's weight (attention q/k/v/o and the
routed experts' w1/w2/w3) as float8_e4m3fn with a fp32 `weight_scale` (per tensor: shape []; per channel:
[N, 1]); routers, embeddings, norms and lm_head stay 16/32-bit (`ignored_layers`).

The loaded model keeps its experts in FP8 (`QuantizedLocalExperts`, the checkpoint's own bytes, the scale
broadcast per row) and dequantizes the attention weights at load, so it is, by definition, the 16-bit model
whose weights are the dequantized FP8 ones: logits equal to that model's within fp32 rounding (atol 1e-5).
An FP8 checkpoint of the experts alone, per channel, holds what `model.quantization: fp8` makes of the
16-bit checkpoint at load: the same logits. Against the original 16-bit model the bound is loose and
stated: FP8 rounds each weight by ~2.6% (relative RMS), and the untrained tiny model's routers flip
experts under that noise, so its logits move by ~18% (relative RMS); the quality of FP8 on a model with
real routing is bench/quant_quality.py's (tiny-trained: 99.1% top-1 agreement).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_runtime.checkpoint.loader import load_model
from moe_runtime.errors import CheckpointError
from moe_runtime.kernels.attention import AttentionMetadata
from moe_runtime.model.experts import QuantizedLocalExperts

PROMPT = [1, 17, 45, 3, 99, 87, 12, 5, 64, 33, 7]
LINEAR = re.compile(r".*(self_attn\.[qkvo]_proj|block_sparse_moe\.experts\.\d+\.w[123])\.weight")
EXPERTS = re.compile(r".*block_sparse_moe\.experts\.\d+\.w[123]\.weight")
QC = {"quant_method": "fp8", "activation_scheme": "dynamic", "ignored_layers": ["lm_head"]}


def logits(model, seq=PROMPT):
    h = model(torch.tensor(seq), torch.arange(len(seq)), AttentionMetadata.for_prompts([len(seq)]))
    return model.compute_logits(h)  # [T, V]


def fp8_quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float8_e4m3fn, weight_scale fp32 [] or [N, 1]) as an FP8 exporter writes them."""
    absmax = w.float().abs().amax(dim=-1, keepdim=True) if per_channel else w.float().abs().amax()
    scale = (absmax / 448.0).clamp(min=1e-12)
    return (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale.to(torch.float32)


def write_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def fp8_tensors(src: Path, per_channel: bool, layers: re.Pattern = LINEAR
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the FP8 checkpoint's tensors, the 16-bit tensors holding their dequantized values); `layers`: the
    weights stored in FP8."""
    fp8, dequantized = {}, {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        if layers.fullmatch(name):
            data, scale = fp8_quantize(w, per_channel)
            fp8[name], fp8[name + "_scale"] = data, scale
            dequantized[name] = (data.float() * scale).to(w.dtype)
        else:
            fp8[name] = dequantized[name] = w
    return fp8, dequantized


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory):
    """{kind: (FP8 dir, 16-bit dir of its dequantized weights)}; kinds: "per_tensor" and "per_channel" (every
    linear layer in FP8), "experts_per_channel" (the routed experts alone)."""
    base = json.loads((tiny_model_dir / "config.json").read_text())
    out = {}
    for kind, per_channel, layers in (("per_tensor", False, LINEAR), ("per_channel", True, LINEAR),
                                      ("experts_per_channel", True, EXPERTS)):
        fp8, deq = fp8_tensors(tiny_model_dir, per_channel, layers)
        root = tmp_path_factory.mktemp(kind)
        out[kind] = (write_checkpoint(tiny_model_dir, root / "fp8", fp8, {**base, "quantization_config": QC}),
                     write_checkpoint(tiny_model_dir, root / "dequantized", deq, base))
    return out


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ("per_tensor", "per_channel"))
def test_fp8_checkpoint_is_its_dequantized_model(checkpoints, tiny_model_dir, kind):
    fp8_dir, deq_dir = checkpoints[kind]
    model = load_model(fp8_dir, "float32", "cpu")
    stored = load_file(str(fp8_dir / "model.safetensors"))
    experts = model.layers[1].block_sparse_moe.experts
    assert isinstance(experts, QuantizedLocalExperts) and experts.scheme == "fp8"
    w1, w3 = (stored[f"model.layers.1.block_sparse_moe.experts.5.{m}.weight"] for m in ("w1", "w3"))
    inter = w1.shape[0]
    assert torch.equal(experts.w13.data[5, :inter].view(torch.uint8), w1.view(torch.uint8))  # own bytes
    assert torch.equal(experts.w13.data[5, inter:].view(torch.uint8), w3.view(torch.uint8))
    s1 = stored["model.layers.1.block_sparse_moe.experts.5.w1.weight_scale"]
    assert torch.equal(experts.w13.scale[5, :inter], s1.reshape(-1).expand(inter))  # broadcast per row
    assert model.dtype == torch.float32  # dense weights dequantized to the model dtype

    got = logits(model)
    torch.testing.assert_close(got, logits(load_model(deq_dir, "float32", "cpu")), atol=1e-5, rtol=0)
    # Against the original 16-bit model (module docstring): relative RMS of the logits < 0.25; measured
    # 0.187 per tensor, 0.168 per channel (seed 0; logits std 1.13).
    assert rel_rms(got, logits(load_model(tiny_model_dir, "float32", "cpu"))) < 0.25


def test_fp8_experts_checkpoint_equals_fp8_quantization_at_load(checkpoints, tiny_model_dir):
    """Per-channel FP8 experts with scale absmax / 448 are what `model.quantization: fp8` computes at load."""
    fp8_dir, _ = checkpoints["experts_per_channel"]
    want = logits(load_model(tiny_model_dir, "float32", "cpu", quantization="fp8"))
    torch.testing.assert_close(logits(load_model(fp8_dir, "float32", "cpu")), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ("per_tensor", "per_channel"))
def test_fp8_dense_projections_kept_with_quantize_dense(checkpoints, kind):
    """`model.quantize_dense` keeps an FP8 checkpoint's attention weights in FP8 (its own bytes, the scale
    per row) instead of dequantizing them at load: the same model (logits within fp32 rounding)."""
    fp8_dir, _ = checkpoints[kind]
    model = load_model(fp8_dir, "float32", "cpu", quantize_dense=True)
    stored = load_file(str(fp8_dir / "model.safetensors"))
    qkv = model.layers[1].self_attn.qkv_proj
    assert qkv.scheme == "fp8" and model.lm_head.scheme == "fp8"  # the head: quantized per row at load
    k = stored["model.layers.1.self_attn.k_proj.weight"]
    q_rows = stored["model.layers.1.self_attn.q_proj.weight"].shape[0]
    rows = slice(q_rows, q_rows + k.shape[0])
    assert torch.equal(qkv.matrix.data[rows].view(torch.uint8), k.view(torch.uint8))
    k_scale = stored["model.layers.1.self_attn.k_proj.weight_scale"].reshape(-1)
    assert torch.equal(qkv.matrix.scale[rows], k_scale.expand(k.shape[0]))
    dense_only = load_model(fp8_dir, "float32", "cpu")
    dense_only.lm_head.weight.copy_(model.lm_head.matrix.dequantize(torch.float32))
    torch.testing.assert_close(logits(model), logits(dense_only), atol=1e-5, rtol=0)


def test_fp8_checkpoint_requantized_to_int8(checkpoints):
    fp8_dir, _ = checkpoints["experts_per_channel"]
    int8 = load_model(fp8_dir, "float32", "cpu", quantization="int8")
    experts = int8.layers[0].block_sparse_moe.experts
    assert experts.scheme == "int8" and experts.w13.dtype == torch.int8
    # int8 rounds the FP8 values again (0.7% of each weight, relative RMS): logits within 5% relative RMS of
    # the FP8 model's (measured 1.1% with every linear layer in FP8, per channel)
    assert rel_rms(logits(int8), logits(load_model(fp8_dir, "float32", "cpu"))) < 0.05


@pytest.mark.parametrize("tier", ("pinned", "mmap"))
def test_offloaded_fp8_checkpoint_gives_the_resident_logits(checkpoints, tier):
    """The offload store reads the checkpoint's FP8 experts (values and scales) into its host tier / slots."""
    from offload_cases import load_offloaded

    from moe_runtime.config import OffloadConfig

    fp8_dir, _ = checkpoints["per_channel"]
    want = logits(load_model(fp8_dir, "float32", "cpu"))
    offload = OffloadConfig(enabled=True, resident_experts_per_layer=2, miss="fetch", prefetch=False, host_tier=tier)
    model, store = load_offloaded(fp8_dir, offload, dtype="float32", device="cpu")
    try:
        assert next(iter(store.layers.values())).w13.dtype == torch.float8_e4m3fn
        torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=0)
    finally:
        store.close()


def test_doctests():
    import doctest

    from moe_runtime.checkpoint import fp8, loader

    assert doctest.testmod(fp8).failed == 0 and doctest.testmod(loader).failed == 0


def test_fp8_checkpoint_in_bf16_serves(checkpoints, tmp_path):
    from moe_runtime.config import load_config
    from moe_runtime.engine.llm_engine import LLMEngine
    from moe_runtime.engine.sampling_params import SamplingParams

    fp8_dir, _ = checkpoints["per_tensor"]
    engine = LLMEngine(load_config(overrides=[f"model.path={fp8_dir}", "model.device=cpu", "model.dtype=bfloat16",
                                              f"engine.cpu_plan_dir={tmp_path}", "cache.num_blocks=64"]))
    (out,) = engine.generate([PROMPT], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(out.token_ids) == 6


# ----------------------------------------------------------------------------------------------------------
# The loader's error matrix: one line naming the tensor / value and what is allowed.

EXPERT = "model.layers.0.block_sparse_moe.experts.3.w2.weight"


def broken(checkpoints, tmp_path, *, config=None, tensors=None) -> Path:
    fp8_dir, _ = checkpoints["per_tensor"]
    cfg = json.loads((fp8_dir / "config.json").read_text())
    stored = load_file(str(fp8_dir / "model.safetensors"))
    return write_checkpoint(fp8_dir, tmp_path / "broken", tensors(stored) if tensors else stored,
                            config(cfg) if config else cfg)


def without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


def _with_nan(w: torch.Tensor) -> torch.Tensor:
    """w with one NaN byte (0x7F: e4m3fn's NaN) where its last row starts."""
    out = w.view(torch.uint8).clone()
    out[-1, 0] = 0x7F
    return out.view(torch.float8_e4m3fn)


ERRORS = (
    ("missing_scale", None, lambda t: without(t, EXPERT + "_scale"),
     rf"{re.escape(EXPERT)} is F8_E4M3 but its scale {re.escape(EXPERT)}_scale is missing"),
    ("values_e5m2", None, lambda t: {**t, EXPERT: t[EXPERT].float().to(torch.float8_e5m2)},
     rf"{re.escape(EXPERT)} has dtype F8_E5M2; allowed: \['BF16', 'F16', 'F32'\], or F8_E4M3"),
    ("int_scale", None, lambda t: {**t, EXPERT + "_scale": torch.tensor(1, dtype=torch.int32)},
     rf"{re.escape(EXPERT)}_scale has dtype I32; allowed: \['F32', 'BF16', 'F16'\]"),
    ("scale_shape", None, lambda t: {**t, EXPERT + "_scale": torch.ones(3)},
     rf"{re.escape(EXPERT)}_scale has shape \[3\]; allowed: \[\] or \[1\]"),
    ("gptq", lambda c: {**c, "quantization_config": {"quant_method": "gptq", "bits": 4}}, None,
     r"quantization_config.quant_method='gptq' is not supported; allowed: \['fp8'\]"),
    ("block_wise", lambda c: {**c, "quantization_config": {**QC, "weight_block_size": [128, 128]}}, None,
     r"weight_block_size=\[128, 128\] \(block-wise FP8 scales\) is not supported"),
    ("no_quantization_config", lambda c: without(c, "quantization_config"), None,
     r"has dtype F8_E4M3; allowed: .*quantization_config has quant_method 'fp8'"),
    ("nan_weight", None, lambda t: {**t, EXPERT: _with_nan(t[EXPERT])},
     rf"tensor {re.escape(EXPERT)} holds 1 NaN value\(s\) as F8_E4M3; allowed: finite values"),
    ("stray_scale", None, lambda t: {**t, "model.layers.0.block_sparse_moe.gate.weight_scale": torch.tensor(1.0)},
     r"unexpected tensor model.layers.0.block_sparse_moe.gate.weight_scale"),
)


@pytest.mark.parametrize("name,config,tensors,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_loader_error_matrix(checkpoints, tmp_path, name, config, tensors, message):
    path = broken(checkpoints, tmp_path, config=config, tensors=tensors)
    with pytest.raises(CheckpointError, match=message) as err:
        load_model(path, "float32", "cpu")
    assert "\n" not in str(err.value)


def test_nan_weight_refused_when_quantized_to_fp8_at_load(tiny_model_dir, tmp_path):
    """A 16-bit checkpoint's NaN expert weight would quantize to a NaN byte, which the native tiles do not
    take: the loader names it (in 16 bits, with quantization none, it loads as it is)."""
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    tensors[EXPERT] = tensors[EXPERT].clone()
    tensors[EXPERT][0, 0] = float("nan")
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    path = write_checkpoint(tiny_model_dir, tmp_path / "nan", tensors, cfg)
    with pytest.raises(CheckpointError, match=rf"tensor {re.escape(EXPERT)} holds 1 NaN value\(s\) as F8_E4M3"):
        load_model(path, "float32", "cpu", quantization="fp8")
    load_model(path, "float32", "cpu")


@pytest.mark.parametrize("kind", ("per_tensor", "per_channel"))
def test_fp8_checkpoint_on_expert_parallel_ranks(checkpoints, kind):
    """A Ray worker's share of an FP8 checkpoint: its experts stay FP8 (the checkpoint's bytes and scales,
    as the local model holds them), before and after a re-placement reads some again from the files."""
    from moe_runtime.cluster.expert_parallel import QuantizedShardedExperts, ShardedExpertsBuilder
    from moe_runtime.cluster.placement_config import build_placement
    from moe_runtime.cluster.planner import round_robin
    from moe_runtime.config import PlacementConfig
    from moe_runtime.model.parts import ModelParts

    fp8_dir, _ = checkpoints[kind]
    full = load_model(fp8_dir, "float32", "cpu")
    cfg = full.config
    placement = round_robin(cfg.num_hidden_layers, cfg.num_local_experts, 2)
    builder = ShardedExpertsBuilder(placement, 1, quantization="fp8")
    model = load_model(fp8_dir, "float32", "cpu", parts=ModelParts(experts=builder))

    def check(placement):
        for layer, (got, want) in enumerate(zip(model.layers, full.layers, strict=True)):
            got, want = got.block_sparse_moe.experts, want.block_sparse_moe.experts
            assert isinstance(got, QuantizedShardedExperts) and got.w13.dtype == torch.float8_e4m3fn
            local = placement.local_experts(1, layer)
            for a, b in ((got.w13, want.w13[local]), (got.w2, want.w2[local])):
                assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
                assert torch.equal(a.scale, b.scale)

    check(placement)
    moved = build_placement(PlacementConfig(workers=2, strategy="contiguous"), cfg.num_hidden_layers,
                            cfg.num_local_experts)  # keeps some of rank 1's experts, reads the others
    assert moved != placement
    builder.apply(moved)
    check(moved)
