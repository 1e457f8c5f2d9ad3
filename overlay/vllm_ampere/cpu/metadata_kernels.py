"""Plain-torch versions of the Triton kernels DeepSeek-V4's attention metadata builders launch.

vLLM's CPU build runs without Triton (`vllm.triton_utils.HAS_TRITON` is False unless the
unreleased triton-cpu backend is installed), so `triton.jit` is a placeholder and every
`kernel[grid](...)` launch fails with "'function' object is not subscriptable". vLLM already
replaces a few core kernels this way (`CpuPlatform.register_triton_kernel_overrides`); these are
the ones the DeepSeek-V4 builders add. Each function reproduces its kernel element for element
(same outputs, same -1 / 0 fills for masked lanes); the kernel it mirrors is named in its
docstring. Patches in patches/cpu_triton_*.py install them.
"""

from __future__ import annotations

import torch


def token_request_mapping(query_start_loc: torch.Tensor, output: torch.Tensor, num_reqs: int,
                          num_mapped: int, num_tokens: int, **_launch_options) -> None:
    """vllm/v1/attention/ops/metadata.py `_token_request_mapping_kernel`: output[t] is the
    request owning token t (binary search over query_start_loc, clamped to num_reqs - 1), or 0
    for t >= num_mapped; only the first num_tokens entries are written."""
    if num_tokens <= 0:
        return
    tokens = torch.arange(num_tokens, device=output.device, dtype=query_start_loc.dtype)
    ends = query_start_loc[1: num_reqs + 1].contiguous()
    req = torch.searchsorted(ends, tokens, right=True).clamp(max=max(num_reqs - 1, 0))
    req = torch.where(tokens < num_mapped, req, torch.zeros_like(req))
    output[:num_tokens] = req.to(output.dtype)


def swa_indices_and_lens(
    swa_indices: torch.Tensor,
    swa_lens: torch.Tensor,
    window_size: int,
    index_width: int,
    left_visible: torch.Tensor,
    right_visible: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    token_to_req_indices: torch.Tensor,
    is_valid_token: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    replay_start: torch.Tensor,
    *,
    num_tokens: int,
    token_offset: int,
    has_image: bool = False,
) -> None:
    """vllm/v1/attention/backends/mla/sparse_swa.py `_compute_swa_indices_and_lens_kernel`: per
    token, the paged slots of its sliding window [start, pos + right] (start clipped at 0 and at
    the request's replay start) in the first swa_len columns, -1 after; invalid tokens get
    length 0 and an all -1 row."""
    if num_tokens <= 0:
        return
    dev = swa_indices.device
    tok = torch.arange(num_tokens, device=dev) + token_offset
    valid = is_valid_token[tok].to(torch.bool)
    req = token_to_req_indices[tok].to(torch.int64)
    q_start = query_start_loc[req].to(torch.int64)
    q_len = query_start_loc[req + 1].to(torch.int64) - q_start
    pos = seq_lens[req].to(torch.int64) - q_len + tok - q_start
    if has_image:
        left = left_visible[tok].to(torch.int64)
        right = right_visible[tok].to(torch.int64)
    else:
        left = right = torch.zeros_like(pos)
    left_add = (left - (window_size - 1)).clamp(min=0)
    start = (pos - (window_size - 1) - left_add).clamp(min=0)
    start = torch.maximum(start, replay_start[req].to(torch.int64))
    length = pos + right + 1 - start
    offs = torch.arange(index_width, device=dev)
    p = start.unsqueeze(-1) + offs
    inside = offs < length.unsqueeze(-1)
    blocks = block_table[req.unsqueeze(-1), torch.where(inside, p // block_size, 0)].to(torch.int64)
    slots = torch.where(inside, blocks * block_size + p % block_size, -1)
    slots = torch.where(valid.unsqueeze(-1), slots, -1)
    # The kernel addresses row `pid` at pid * stride(0): rows may carry a singleton head dim.
    swa_indices.view(swa_indices.shape[0], -1)[:num_tokens, :index_width] = slots.to(swa_indices.dtype)
    swa_lens[:num_tokens] = torch.where(valid, length, 0).to(swa_lens.dtype)


def prefill_gather_lens(prefill_gather_lens: torch.Tensor, seq_lens: torch.Tensor,
                        query_start_loc: torch.Tensor, replay_start: torch.Tensor,
                        num_prefills: int, num_decodes: int, window_size: int) -> None:
    """vllm/v1/attention/backends/mla/sparse_swa.py `ComputePrefillMetadataKernel.kernel`:
    for each prefill, query_len + min(visible prefix, window_size - 1), where the visible prefix
    is the cached context above the replay start."""
    if num_prefills <= 0:
        return
    r = torch.arange(num_decodes, num_decodes + num_prefills, device=seq_lens.device)
    q_len = (query_start_loc[r + 1] - query_start_loc[r]).to(torch.int64)
    prefix = seq_lens[r].to(torch.int64) - q_len
    visible = (prefix - replay_start[r].to(torch.int64)).clamp(min=0)
    out = q_len + visible.clamp(max=window_size - 1)
    prefill_gather_lens[:num_prefills] = out.to(prefill_gather_lens.dtype)


def _token_requests(query_start_loc: torch.Tensor, num_reqs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(request of each token in [0, query_start_loc[num_reqs]), the token's offset in it)."""
    qsl = query_start_loc[: num_reqs + 1].to(torch.int64)
    lens = qsl[1:] - qsl[:-1]
    req = torch.repeat_interleave(torch.arange(num_reqs, device=qsl.device), lens.clamp(min=0))
    offset = torch.arange(req.numel(), device=qsl.device) - (qsl[req] - qsl[0])
    return req, offset


def compressed_slot_mapping(compressed_slot_mapping: torch.Tensor, slot_mapping: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            block_table: torch.Tensor, block_size: int, compress_ratio: int,
                            dcp_world_size: int, cp_interleave: int) -> None:
    """vllm/v1/attention/backends/mla/compressor_utils.py `CompressedSlotMappingKernel.kernel`:
    the token that closes a compressed state (position + 1 divisible by the ratio, own slot not
    PAD) maps to that state's paged slot (DCP-local position // ratio); other tokens to -1."""
    num_reqs = min(block_table.shape[0], query_start_loc.numel() - 1)
    if num_reqs <= 0:
        return
    req, offset = _token_requests(query_start_loc, num_reqs)
    tok = query_start_loc[0].to(torch.int64) + torch.arange(req.numel(), device=req.device)
    q_len = (query_start_loc[req + 1] - query_start_loc[req]).to(torch.int64)
    pos = seq_lens[req].to(torch.int64) - q_len + offset
    valid = ((pos + 1) % compress_ratio == 0) & (slot_mapping[tok] != -1)
    local = pos // (cp_interleave * dcp_world_size) * cp_interleave + pos % cp_interleave
    state = local // compress_ratio
    block = block_table[req, torch.where(valid, state // block_size, 0)].to(torch.int64)
    out = torch.where(valid, block * block_size + state % block_size, -1)
    compressed_slot_mapping[tok] = out.to(compressed_slot_mapping.dtype)


def prepare_uniform_decode(seq_lens: torch.Tensor, decode_seq_lens: torch.Tensor,
                           block_table: torch.Tensor, expanded_block_table: torch.Tensor,
                           decode_lens: torch.Tensor, num_decode_tokens: int,
                           max_decode_len: int) -> None:
    """vllm/v1/attention/backends/mla/indexer.py `PrepareUniformDecodeKernel.kernel`: expand
    requests with max_decode_len query tokens each into one row per token: its own context
    length (clamped at 0), a copy of its request's block-table row, and decode length 1."""
    if num_decode_tokens <= 0:
        return
    idx = torch.arange(num_decode_tokens, device=seq_lens.device)
    req, local = idx // max_decode_len, idx % max_decode_len
    lens = (seq_lens[req].to(torch.int64) - max_decode_len + local + 1).clamp(min=0)
    decode_seq_lens[:num_decode_tokens] = lens.to(decode_seq_lens.dtype)
    cols = min(expanded_block_table.stride(0), block_table.shape[1], expanded_block_table.shape[1])
    expanded_block_table[:num_decode_tokens, :cols] = block_table[req, :cols]
    decode_lens[:num_decode_tokens] = 1


def prefill_chunk_metadata(query_start_loc: torch.Tensor, uncompressed_seq_lens: torch.Tensor,
                           cu_compressed_seq_lens: torch.Tensor,
                           row_start_cu_compressed_seq_lens: torch.Tensor,
                           token_to_seq: torch.Tensor, cu_compressed_seq_len_ks: torch.Tensor,
                           cu_compressed_seq_len_ke: torch.Tensor, query_slice_start: int,
                           query_slice_stop: int, DCP_RANK: int, DCP_WORLD: int,
                           DCP_INTERLEAVE: int, *, num_reqs: int, COMPRESS_RATIO: int) -> None:
    """vllm/v1/attention/backends/mla/indexer.py `BuildPrefillChunkMetadataKernel.kernel`: for
    each query token inside the slice, the start (ks) and end (ke) of its causal compressed
    context in the gathered K rows; token_to_seq marks the request of every compressed row."""
    if num_reqs <= 0:
        return
    req, offset = _token_requests(query_start_loc, num_reqs)
    abs_pos = query_start_loc[req].to(torch.int64) + offset
    keep = (abs_pos >= query_slice_start) & (abs_pos < query_slice_stop)
    req, offset, out_pos = req[keep], offset[keep], abs_pos[keep] - query_slice_start
    q_len = (query_start_loc[req + 1] - query_start_loc[req]).to(torch.int64)
    row_start = row_start_cu_compressed_seq_lens[req].to(torch.int64)
    length = (uncompressed_seq_lens[req].to(torch.int64) - q_len + 1 + offset) // COMPRESS_RATIO
    if DCP_WORLD > 1:  # interleave-aware DCP share, as get_dcp_local_seq_lens
        base = length // DCP_INTERLEAVE // DCP_WORLD * DCP_INTERLEAVE
        rem = (length - base * DCP_WORLD - DCP_RANK * DCP_INTERLEAVE).clamp(min=0, max=DCP_INTERLEAVE)
        length = base + rem
    cu_compressed_seq_len_ks[out_pos] = row_start.to(cu_compressed_seq_len_ks.dtype)
    cu_compressed_seq_len_ke[out_pos] = (row_start + length).to(cu_compressed_seq_len_ke.dtype)
    cu = cu_compressed_seq_lens[: num_reqs + 1].to(torch.int64)
    owners = torch.repeat_interleave(torch.arange(num_reqs, device=cu.device), (cu[1:] - cu[:-1]).clamp(min=0))
    token_to_seq[cu[0]: cu[0] + owners.numel()] = owners.to(token_to_seq.dtype)


def kernel_override(impl):
    """Patch factory for a bare `@triton.jit` kernel launched as `kernel[grid](...)`: vLLM's own
    KernelOverride (vllm/triton_utils/dispatcher.py) forwards the launch to `impl`."""

    def replace(kernel):
        from vllm.triton_utils.dispatcher import KernelOverride

        return KernelOverride(kernel, impl)

    return replace


def launcher_override(impl):
    """Patch factory for a `VllmTritonJitKernel.__call__` launcher: same call, torch body."""

    def replace(call):
        def launch_in_torch(self, *args, **kwargs):
            return impl(*args, **kwargs)

        launch_in_torch.__doc__ = impl.__doc__
        return launch_in_torch

    return replace
