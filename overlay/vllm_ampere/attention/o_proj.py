"""DeepSeek-V4's attention output projection on sm80/sm86: inverse RoPE, grouped wo_a, wo_b.

The stock CUDA path (`deep_gemm_fp8_o_proj`, vllm/models/deepseek_v4/nvidia/ops/o_proj.py) runs
DeepGEMM's fp8_einsum (Hopper/Blackwell) after a Triton inverse-RoPE kernel whose IR names the
e4m3 type Triton refuses below sm_89. Here the inverse RoPE is plain torch and wo_a is applied
per group through its quant method (dsv4_int's INT8 `apply_grouped`) or a bf16 bmm.
"""

from __future__ import annotations

import torch

from vllm_ampere.attention.rope import gptj_rotate


def inverse_rope_o(o: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                   rope_dim: int) -> torch.Tensor:
    """Undo the query's GPT-J (interleaved-pair) RoPE on the last `rope_dim` dims of each head.

    o: [T, H, D]; cos_sin_cache: [max_pos, rope_dim] (cos halves then sin halves). The attention
    output is a mix of rows at other positions; rotating by -pos recovers what wo_a expects
    (same math as vLLM's inverse_gptj_rope_o_proj_cpu and the Triton kernel's QUANTIZE=False).
    """
    nope = o.shape[-1] - rope_dim
    rope = gptj_rotate(o[..., nope:], positions, cos_sin_cache, inverse=True)
    return torch.cat((o[..., :nope], rope.to(o.dtype)), dim=-1)


def grouped_wo_a(wo_a: torch.nn.Module, x: torch.Tensor, n_groups: int, o_lora_rank: int) -> torch.Tensor:
    """x [T, G, K] -> z [T, G, o_lora_rank], group g of wo_a's rows applied to x[:, g]."""
    method = getattr(wo_a, "quant_method", None)
    if hasattr(method, "apply_grouped"):  # dsv4_int INT8 (vllm_ampere.quant.linear_w8a16)
        return method.apply_grouped(wo_a, x)
    weight = wo_a.weight
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(
            f"DeepSeek-V4 wo_a has {weight.dtype} weights; on sm80/sm86 there is no FP8 einsum. "
            "Serve a dsv4_int checkpoint (`vllm-ampere convert`) or a BF16 one")
    w = weight.view(n_groups, o_lora_rank, -1)
    return torch.bmm(x.transpose(0, 1).to(w.dtype), w.transpose(1, 2)).transpose(0, 1)
