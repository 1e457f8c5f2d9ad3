"""Define DeepSeek-V4's missing `_C` CPU ops in torch wherever the loaded kernel library lacks them."""

from __future__ import annotations

import functools

from vllm.logger import init_logger

from vllm_ampere.cpu import is_cpu_platform
from vllm_ampere.patching import Patch

logger = init_logger(__name__)


def _fill_gaps() -> None:
    from vllm_ampere.cpu.ops import register_missing_ops

    added = register_missing_ops()
    if added:
        logger.info("vllm_ampere: this CPU kernel library lacks %d DeepSeek-V4 ops; torch versions "
                    "registered in torch.ops._C: %s", len(added), ", ".join(added))


def _replace(import_kernels):
    from vllm_ampere.cpu.ops import kernel_library_loaded

    @functools.wraps(import_kernels)
    def import_kernels_and_fill_gaps(cls) -> None:
        import_kernels(cls)
        _fill_gaps()

    # vllm._custom_ops calls import_kernels at its own import, which usually precedes the
    # plugin: then the library is already loaded and the gaps are filled now. Never before it
    # loads: loading a library that defines an op we defined would fail.
    if kernel_library_loaded():
        _fill_gaps()
    return import_kernels_and_fill_gaps


PATCH = Patch(
    name="cpu_avx2_torch_ops",
    target="vllm.platforms.cpu:CpuPlatform.import_kernels",
    signature="(cls) -> None",
    why="vLLM's CPU build compiles its DeepSeek-V4 kernels (bmm_cpu, convert_weight_packed, "
    "hc_{pre,post,head}_fused_cpu, fused_qnorm_rope_kv_insert_cpu, save_partial_states_cpu, "
    "compress_norm_rope_store{,_indexer}_cpu, flash_mla_with_kvcache_cpu, "
    "inverse_gptj_rope_o_proj_cpu, fused_indexer_q_rope_quant_cpu, fp8_paged_mqa_logits_cpu, "
    "topk_transform_512_cpu) only into its AVX-512 library; on AVX2 CPUs import_kernels loads "
    "_C_AVX2 and the model's first forward fails on a missing torch.ops._C op.",
    how="After import_kernels loads the library (and at install time if it already has), every op "
    "of vllm_ampere.cpu.ops.OPS that torch.ops._C lacks is defined there with the stock schema, a "
    "CPU implementation from our torch references and a fake for torch.compile; ops the library "
    "has are left alone, so AVX-512 CPUs keep the stock kernels.",
    vllm_checked="0.32.0",
    processes=("API server", "engine core", "workers"),
    remove_when="vLLM's AVX2 kernel library ships the DeepSeek-V4 CPU ops (each op is skipped on "
    "its own as soon as the library has it).",
    replace=_replace,
    needed=is_cpu_platform,
)
