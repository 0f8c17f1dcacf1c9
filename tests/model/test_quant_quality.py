"""The accuracy gate of quantized experts (bench/quant_quality.py's `compare`) on tiny-trained, whose routers
learned real structure: teacher-forced over held-out text against the bf16 model.

Bounds (the issue's targets for tiny-trained): int8 top-1 agreement >= 99% and perplexity within 1% of bf16;
fp8 perplexity within 2% (and top-1 >= 98%). Router agreement: the same top-k experts for >= 99% (int8) and
>= 98% (fp8) of (token, layer). Measured on 16 windows (docs/benchmarks.md): int8 99.5% / +0.01% / 99.9%,
fp8 99.1% / +0.00% / 99.5%; here 4 windows of 256 tokens on the reference arithmetic (`torch` backend).
"""

from __future__ import annotations

import importlib.util
import sys
import sysconfig
from pathlib import Path

import pytest

from moe_runtime.presets.tiny_trained import write_trained

_PATH = Path(__file__).parents[2] / "bench" / "quant_quality.py"
_spec = importlib.util.spec_from_file_location("quant_quality", _PATH)
qq = importlib.util.module_from_spec(_spec)
sys.modules["quant_quality"] = qq  # its dataclass looks its module up there
_spec.loader.exec_module(qq)

# `+dense` (model.quantize_dense: attention and the LM head too) rounds every weight the token meets, so its
# top-1 bound is looser; measured on these 4 windows: int8+dense 98.9% / -0.04% / 99.5%, fp8+dense
# 96.7% / +0.06% / 98.8% (16 windows: 99.1% and 97.0%; docs/benchmarks.md).
BOUNDS = {"int8": dict(top1=0.99, ppl=0.01, router=0.99), "fp8": dict(top1=0.98, ppl=0.02, router=0.98),
          "int8+dense": dict(top1=0.985, ppl=0.01, router=0.99),
          "fp8+dense": dict(top1=0.96, ppl=0.02, router=0.98)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model_dir = write_trained("tiny-trained", tmp_path_factory.mktemp("tiny-trained"))
    ref = qq.load(model_dir, "none", "torch")
    return model_dir, ref, qq.windows(model_dir, 4, 256, ref.config.vocab_size)


@pytest.mark.parametrize("scheme", BOUNDS)
def test_quantized_experts_agree_with_bf16(trained, scheme):
    model_dir, ref, seqs = trained
    assert len(seqs) == 4 and all(len(s) == 256 for s in seqs)
    q = qq.compare(ref, qq.load(model_dir, scheme, "torch"), seqs, scheme)
    bound = BOUNDS[scheme]
    summary = f"{scheme}: top-1 {q.top1:.4f}, perplexity {q.ppl_ref:.3f} -> {q.ppl:.3f}, router {q.router:.4f}"
    assert q.tokens == 4 * 255
    assert q.top1 >= bound["top1"], summary
    assert abs(q.ppl_change) <= bound["ppl"], summary
    assert q.router >= bound["router"], summary


def test_heldout_text_is_not_the_training_text():
    """tiny-trained learned the first 3 MB in sorted order; the held-out text comes from the other end."""
    held = qq.heldout_text(20_000)
    first = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[0].read_text(errors="replace")[:2000]
    assert first not in held
