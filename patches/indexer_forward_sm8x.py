"""Run the DeepSeek-V4 lightning indexer without DeepGEMM on sm8x GPUs."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(forward_cuda):
    @functools.wraps(forward_cuda)
    def forward_cuda_sm8x(self, hidden_states, q_quant, k, weights):
        from vllm_ampere.attention.backend import tensor_on_ampere

        if not tensor_on_ampere(hidden_states):
            return forward_cuda(self, hidden_states, q_quant, k, weights)
        from vllm_ampere.attention.indexer_forward import sparse_attn_indexer_sm8x

        if isinstance(q_quant, tuple):
            raise NotImplementedError("MXFP4 indexer queries are Blackwell-only")
        return sparse_attn_indexer_sm8x(self, hidden_states, q_quant, weights,
                                        imma=getattr(self, "vllm_ampere_imma", False))

    return forward_cuda_sm8x


PATCH = Patch(
    name="indexer_forward_sm8x",
    target="vllm.model_executor.layers.sparse_attn_indexer:SparseAttnIndexer.forward_cuda",
    signature="(self, hidden_states: torch.Tensor, q_quant: torch.Tensor | tuple[torch.Tensor, "
    "torch.Tensor], k: torch.Tensor | None, weights: torch.Tensor)",
    why="The CUDA indexer scores compressed tokens with DeepGEMM's fp8_mqa_logits / "
    "fp8_paged_mqa_logits, which exist for Hopper and Blackwell only.",
    how="On sm8x GPUs runs vllm_ampere.attention.indexer_forward: the stock metadata walk "
    "(prefill chunks, decode requests) with BF16 logits through torch in row and column chunks "
    "(INT8 s8 x s8 when the checkpoint's IMMA flag is on) and a deterministic top-k; other "
    "GPUs take the stock path.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="DeepGEMM (or another vLLM indexer backend) supports sm80.",
    replace=_replace,
)
