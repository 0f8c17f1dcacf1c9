"""Speculative decoding: propose a few tokens cheaply, verify them all in one forward of the model.

    proposer.py  the interface the model runner calls once per step
    ngram.py     prompt lookup: what followed the last occurrence of the sequence's final n-gram
    draft.py     a small model with the same vocabulary, greedy
Verification is `Sampler.verify` (engine/sampler.py); the scheduler grants each decoding request a budget
of `speculative.num_tokens` and advances it by what was accepted (engine/scheduler.py).
"""

from __future__ import annotations

from moe_runtime.config import ModelConfig, RuntimeConfig
from moe_runtime.engine.spec.ngram import NgramProposer
from moe_runtime.engine.spec.proposer import ProposalRequest, Proposer


def make_proposer(cfg: RuntimeConfig, target: ModelConfig, num_blocks: int, progress: bool = False
                  ) -> Proposer | None:
    """The proposer `cfg.speculative` asks for; None without speculative decoding."""
    spec = cfg.speculative
    if spec.method == "ngram":
        return NgramProposer(spec.ngram_min, spec.ngram_max)
    if spec.method == "draft":
        from moe_runtime.engine.spec.draft import load_draft

        return load_draft(cfg, target, num_blocks, progress)
    return None


__all__ = ["NgramProposer", "ProposalRequest", "Proposer", "make_proposer"]
