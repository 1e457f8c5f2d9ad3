"""reference.moe (the routed experts' CPU path) against a per-token, per-slot loop, with expert
parallelism's expert_map and slots that route nowhere (id -1)."""

import pytest
import torch

from vllm_ampere.quant import reference

T, H, I, E_GLOBAL, TOPK, LIMIT = 6, 64, 32, 8, 3, 10.0


def per_token(x, w13, w2, topk_weights, topk_ids, expert_map):
    out = torch.zeros(x.shape[0], H)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            gid = int(topk_ids[t, k])
            local = gid if expert_map is None or gid < 0 else int(expert_map[gid])
            if gid < 0 or local < 0:
                continue
            h = x[t] @ w13[local].T
            gate, up = h[:I].clamp(max=LIMIT), h[I:].clamp(-LIMIT, LIMIT)
            out[t] += topk_weights[t, k] * ((torch.nn.functional.silu(gate) * up) @ w2[local].T)
    return out


@pytest.mark.parametrize("ep", [False, True])
def test_matches_the_per_token_loop(ep):
    g = torch.Generator().manual_seed(1)
    # With EP this rank holds global experts 1, 4 and 7 (the last global id is local, so a -1
    # slot that indexed expert_map[-1] would land on a real expert).
    expert_map = torch.tensor([-1, 0, -1, -1, 1, -1, -1, 2]) if ep else None
    local = 3 if ep else E_GLOBAL
    x = torch.randn(T, H, generator=g) * 4
    w13 = torch.randn(local, 2 * I, H, generator=g) / 8
    w2 = torch.randn(local, H, I, generator=g) / 8
    topk_ids = torch.stack([torch.randperm(E_GLOBAL, generator=g)[:TOPK] for _ in range(T)])
    topk_ids[0, 1] = topk_ids[3, 0] = -1  # slots that route nowhere
    topk_ids[2, 2] = 7
    topk_weights = torch.rand(T, TOPK, generator=g)
    got = reference.moe(x, w13, w2, topk_weights, topk_ids, LIMIT, expert_map)
    torch.testing.assert_close(got, per_token(x, w13, w2, topk_weights, topk_ids, expert_map), rtol=1e-5, atol=1e-5)
