"""DeepSeek-V4's GPT-J (interleaved-pair) RoPE in fp32, forward and inverse.

One implementation for every place that rotates: the query / SWA-KV insert and the FP8 indexer
query references, the compressor store step, the BF16 indexer query and the attention output's
inverse rotation before wo_a. cos_sin_cache [max_pos, rope] holds the cos halves, then the sin
halves (vLLM's RotaryEmbedding layout); pair j is (x[2j], x[2j + 1]).
"""

from __future__ import annotations

import torch


def gptj_rotate(x_rope: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, *,
                inverse: bool = False) -> torch.Tensor:
    """Rotate the pairs of x_rope [T, ..., rope] by +position (by -position when `inverse`:
    what undoes the query's rotation on the attention output); fp32 result."""
    rope = cos_sin_cache.shape[-1]
    cs = cos_sin_cache.index_select(0, positions.to(torch.long)).to(torch.float32)
    shape = (cs.shape[0],) + (1,) * (x_rope.dim() - 2) + (rope // 2,)
    cos, sin = cs[:, : rope // 2].reshape(shape), cs[:, rope // 2:].reshape(shape)
    if inverse:
        sin = -sin  # rotation by -theta; negation is exact, so this equals the expanded form
    pairs = x_rope.to(torch.float32).unflatten(-1, (rope // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), -1).flatten(-2)


def gptj_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Forward RoPE on the last rope dims of x [T, ..., D]; the whole row in fp32."""
    rope = cos_sin_cache.shape[-1]
    xf = x.to(torch.float32)
    return torch.cat((xf[..., :-rope], gptj_rotate(xf[..., -rope:], positions, cos_sin_cache)), -1)
