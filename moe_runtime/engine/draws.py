"""Counter-based uniform draws for seeded requests: u depends only on (seed, position, token id).

A seeded request's draws come from a hash, not a generator, so its tokens depend on nothing else in the
batch, on no generator state, nor on whether it was preempted and recomputed (engine/sampler.py).
"""

from __future__ import annotations

import torch

_U64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)  # splitmix64's odd increment (golden ratio), as a signed int64
_MUL1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's finalizer multipliers (Stafford's mix 13), signed
_MUL2 = 0x94D049BB133111EB - (1 << 64)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64: torch's `>>` is arithmetic, so clear the copied sign bits."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 words, a bijection (int64 multiplication wraps mod 2**64)."""
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def seed_as_int64(seed: int) -> int:
    """Any Python int as the int64 with the same low 64 bits (seeds equal mod 2**64 draw alike)."""
    return ((seed & _U64) ^ (1 << 63)) - (1 << 63)


def hash_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u[z, t] in (0, 1) for token t of the row with seeds[z] at positions[z]: stateless and reproducible.

    seeds, positions: [Z] int64 on any device (seeds reduced by `seed_as_int64`). Returns u [Z, V] float32
    on that device. Each row is a splitmix64 stream that starts at a hash of (seed, position):
        key = mix64(mix64(seed) ^ position)
        u[t] = (top 24 bits of mix64(key + (t + 1) * GAMMA), the lowest of them set to 1) * 2**-24
    so u takes the 2**23 odd multiples of 2**-24: never 0 or 1, and exact in float32. Only int64 arithmetic
    (wrapping multiply, masked shifts) and one exact int -> float conversion: CPU and CUDA give bit-identical
    u. Example: seed 0 at position 0 is splitmix64 seeded with 0, whose first word is 0xE220A8397B1DCDAF
    (tests/engine/test_sampling.py also checks a pure-Python splitmix64):

    >>> u = hash_uniform(torch.tensor([0]), torch.tensor([0]), 3)
    >>> u
    tensor([[0.8833, 0.4315, 0.0264]])
    >>> u[0, 0].item() == 0xE220A9 / 2**24
    True
    """
    key = _mix64(_mix64(seeds) ^ positions)  # [Z]
    counter = torch.arange(1, vocab_size + 1, device=seeds.device) * _GAMMA  # [V], wraps
    z = _mix64(key[:, None] + counter[None, :])  # [Z, V]
    return (_shr(z, 40) | 1).to(torch.float32) * 2.0**-24  # [Z, V]
