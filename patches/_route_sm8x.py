"""The replacement behind attn_flashmla_{decode,prefill}_sm8x: one routing rule for both."""

from __future__ import annotations

import functools


def route_on_ampere(ours_name: str):
    """Patch factory: when q (first argument) is on an sm8x GPU, call
    `vllm_ampere.ops.flashmla.<ours_name>` with the same arguments; otherwise the stock function."""

    def replace(stock):
        @functools.wraps(stock)
        def routed(*args, **kwargs):
            from vllm_ampere.attention.backend import tensor_on_ampere

            q = kwargs["q"] if "q" in kwargs else args[0]
            if not tensor_on_ampere(q):
                return stock(*args, **kwargs)
            from vllm_ampere.ops import flashmla

            return getattr(flashmla, ours_name)(*args, **kwargs)

        return routed

    return replace
