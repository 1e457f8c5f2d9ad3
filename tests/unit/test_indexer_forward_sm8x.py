"""The sm8x indexer's forward (attention/indexer_forward.py) on the batches a CUDA server builds:
which keys each query row scores and where its top-k lands, with metadata laid out as vLLM
0.32.0's DeepseekV32IndexerMetadataBuilder lays it out. The scoring itself is tested against
vLLM's CPU kernels in test_indexer_sm8x.py; here a row's choice is checked against its own
scores over exactly the keys the stock indexer lets it see (a query at position p of a request:
its compressed entries [0, (p + 1) // ratio)), plus the patch that makes the builder flatten MTP
rows on sm8x."""

from types import SimpleNamespace

import pytest
import torch
from vllm.v1.attention.backends.mla import indexer as stock_indexer

import vllm_ampere.attention.indexer_forward as forward
from vllm_ampere.attention import indexer as ix
from vllm_ampere.patches import indexer_native_decode_sm8x
from test_indexer_sm8x import _fp8_cache

H, D, RATIO, TOPK, BS = 8, 128, 4, 64, 16


class Requests:
    """Requests (tokens after this step, tokens scheduled now), decodes first as vLLM orders them,
    each with random compressed keys in its own blocks of one paged FP8 indexer cache."""

    def __init__(self, reqs: list[tuple[int, int]], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.reqs = reqs
        counts = [seq // RATIO for seq, _ in reqs]
        per_req = max((c + BS - 1) // BS for c in counts)
        # One cache for all: request r's entries are rows [r * per_req * BS, ...) of the key array.
        keys = torch.randn(len(reqs) * per_req * BS, D, generator=g)
        self.cache, table = _fp8_cache(keys, BS)
        self.tables = table.view(len(reqs), per_req)
        values, scales, _ = ix.gather_keys(self.cache, table.unsqueeze(0), torch.tensor([keys.shape[0]]))
        self.keys = [(values[r * per_req * BS:][:c], scales[r * per_req * BS:][:c]) for r, c in enumerate(counts)]
        self.tokens = sum(q for _, q in reqs)
        self.q = torch.randn(self.tokens, H, D, generator=g).to(torch.bfloat16)
        self.w = torch.rand(self.tokens, H, generator=g)
        self.token_req = [r for r, (_, q) in enumerate(reqs) for _ in range(q)]
        self.positions = [p for seq, q in reqs for p in range(seq - q, seq)]
        self.query_start = [0]
        for _, q in reqs:
            self.query_start.append(self.query_start[-1] + q)

    def prefill_chunk(self, first: int, last: int, q_lo: int, q_hi: int, skip_kv_gather: bool):
        """build_prefill_chunk_metadata's chunk for requests [first, last), query rows [q_lo, q_hi)
        of the chunk: ks = the request's start in the gathered keys, ke = ks + (p + 1) // ratio."""
        lens = torch.tensor([self.reqs[r][0] // RATIO for r in range(first, last)], dtype=torch.int32)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(lens, 0)
        ks = [int(cu[i]) for i, r in enumerate(range(first, last)) for _ in range(self.reqs[r][1])]
        ke = [int(cu[i]) + (p + 1) // RATIO for i, r in enumerate(range(first, last))
              for p in range(self.reqs[r][0] - self.reqs[r][1], self.reqs[r][0])]
        base = self.query_start[first]
        return SimpleNamespace(block_table=self.tables[first:last], local_cu_seq_lens=cu,
                               skip_kv_gather=skip_kv_gather, token_start=base + q_lo, token_end=base + q_hi,
                               cu_seqlen_ks=torch.tensor(ks[q_lo:q_hi], dtype=torch.int32),
                               cu_seqlen_ke=torch.tensor(ke[q_lo:q_hi], dtype=torch.int32))

    def run(self, md, monkeypatch, spare_rows: int = 3) -> torch.Tensor:
        buf = torch.full((self.tokens + spare_rows, TOPK), 7, dtype=torch.int32)
        op = SimpleNamespace(use_fp4_cache=False, skip_k_cache_insert=True, dcp_world_size=1, use_pcp=False,
                             candidate_blocks=None, topk_indices_buffer=buf, topk_tokens=TOPK,
                             k_cache=SimpleNamespace(prefix="indexer", kv_cache=self.cache))
        monkeypatch.setattr(forward, "get_forward_context", lambda: SimpleNamespace(attn_metadata={"indexer": md}))
        out = forward.sparse_attn_indexer_sm8x(op, torch.empty(self.tokens, 1), self.q, self.w, imma=False)
        assert out is buf and (buf[self.tokens:] == 7).all()  # rows past this step untouched
        return buf[: self.tokens]

    def check(self, out: torch.Tensor) -> None:
        """Each row: min(n, topk) valid entries first, all < n, and each as good as the n keys'
        top-k by the row's own scores (ties and BF16 neighbours allowed within 1% of the range)."""
        for t in range(self.tokens):
            n = (self.positions[t] + 1) // RATIO
            values, scales = self.keys[self.token_req[t]]
            row = out[t].tolist()
            valid = min(n, TOPK)
            assert all(i >= 0 for i in row[:valid]) and all(i == -1 for i in row[valid:]), (t, row)
            chosen = torch.tensor(row[:valid], dtype=torch.int64)
            assert len(set(row[:valid])) == valid and (chosen < n).all(), (t, n, row)
            if not valid:
                continue
            logits = ix.indexer_logits(self.q[t:t + 1], self.w[t:t + 1], values[:n], scales[:n])[0]
            kth = logits.topk(valid).values[-1]
            spread = (logits.max() - logits.min()).clamp_min(1e-6)
            assert logits[chosen].min() >= kth - 1e-2 * spread, (t, n)


def test_mixed_batch_decodes_prefix_hit_and_chunk_continuation(monkeypatch):
    # Three decodes (one with fewer entries than top-k, so its count shows its range); a prefill
    # after a prefix-cache hit (its chunk starts at 1024); the next chunk of a long prompt (from
    # 2000). The prefill rows are split into two query sub-chunks, the second reusing the first's
    # gathered keys (skip_kv_gather), as the builder does for large chunks.
    batch = Requests([(901, 1), (702, 1), (163, 1), (1301, 277), (2101, 101)])
    prefill_rows = 277 + 101
    md = SimpleNamespace(
        num_prefills=2, num_decodes=3, num_decode_tokens=3,
        prefill=SimpleNamespace(chunks=[batch.prefill_chunk(3, 5, 0, 200, False),
                                        batch.prefill_chunk(3, 5, 200, prefill_rows, True)]),
        decode=SimpleNamespace(decode_lens=torch.ones(3, dtype=torch.int32), requires_padding=False,
                               seq_lens=torch.tensor([[s // RATIO] for s in (901, 702, 163)], dtype=torch.int32),
                               block_table=batch.tables[:3]))
    batch.check(batch.run(md, monkeypatch))


def test_first_tokens_see_no_compressed_entries(monkeypatch):
    batch = Requests([(3, 1), (9, 9)])  # a decode at position 2, a prefill of 9 tokens from 0
    md = SimpleNamespace(
        num_prefills=1, num_decodes=1, num_decode_tokens=1,
        prefill=SimpleNamespace(chunks=[batch.prefill_chunk(1, 2, 0, 9, False)]),
        decode=SimpleNamespace(decode_lens=torch.ones(1, dtype=torch.int32), requires_padding=False,
                               seq_lens=torch.tensor([[0]], dtype=torch.int32), block_table=batch.tables[:1]))
    out = batch.run(md, monkeypatch)
    batch.check(out)
    assert (out[0] == -1).all() and (out[1:4] == -1).all() and out[4, 0] == 0  # position 3 sees entry 0


def test_mtp_rows_flattened_by_the_builder(monkeypatch):
    """MTP with one speculative token: 2 query rows per request. Flattened, each row is one
    decode row with its own length (the builder's repeat_interleave path)."""
    batch = Requests([(902, 2), (164, 2)])  # the second: fewer entries than top-k
    lens = torch.tensor([[(p + 1) // RATIO] for p in batch.positions], dtype=torch.int32)
    md = SimpleNamespace(
        num_prefills=0, num_decodes=2, num_decode_tokens=4,
        decode=SimpleNamespace(decode_lens=torch.ones(4, dtype=torch.int32), requires_padding=False, seq_lens=lens,
                               block_table=batch.tables.repeat_interleave(2, dim=0)))
    out = batch.run(md, monkeypatch)
    batch.check(out)
    assert [(row >= 0).sum().item() for row in out[2:]] == [40, 41]  # positions 162, 163: (p + 1) // 4
    # The native layout ([B, 2] lengths for 2B tokens) is refused by name, not misread.
    md.decode = SimpleNamespace(decode_lens=torch.ones(2, dtype=torch.int32), requires_padding=False,
                                seq_lens=lens.view(2, 2), block_table=batch.tables)
    with pytest.raises(NotImplementedError, match="indexer_native_decode_sm8x"):
        batch.run(md, monkeypatch)


@pytest.mark.parametrize("major,minor", [(8, 0), (8, 6), (9, 0)])
def test_builder_flattens_mtp_rows_on_sm8x_only(monkeypatch, fake_cuda, major, minor):
    fake_cuda(major, minor)
    patch = indexer_native_decode_sm8x.PATCH
    stock = patch.original()  # the stock function, even where the patchset is installed
    patched = patch.replace(stock)
    monkeypatch.setattr(stock_indexer, "has_deep_gemm", lambda: False)  # as indexer_metadata_sm8x answers
    if major == 8:
        assert [patched(n) for n in (1, 2, 3)] == [True, False, False]
        assert stock(2)  # stock would hand native rows to our indexer
    else:
        assert [patched(n) for n in (1, 2, 3)] == [stock(n) for n in (1, 2, 3)]
