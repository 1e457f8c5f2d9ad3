"""Pick vllm_ampere's DeepSeek-V4 attention on sm80/sm86, refuse clearly below sm_80."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(select_dsv4_attn_cls):
    @functools.wraps(select_dsv4_attn_cls)
    def select_dsv4_attn_cls_ampere(vllm_config):
        from vllm.logger import init_logger
        from vllm.platforms import current_platform
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        from vllm_ampere.attention.backend import check_capability, is_ampere_family

        capability = current_platform.get_device_capability()
        check_capability(capability)
        if not is_ampere_family(capability):
            return select_dsv4_attn_cls(vllm_config)
        backend = vllm_config.attention_config.backend
        if backend is not None and backend not in (AttentionBackendEnum.FLASHMLA_SPARSE,
                                                   AttentionBackendEnum.FLASHMLA_SPARSE_DSV4):
            raise ValueError(
                f"attention backend {backend.name} has no sm_{capability.major}{capability.minor} "
                "kernels for DeepSeek-V4; leave --attention-backend unset (vllm_ampere's sparse "
                "MLA is used on sm80/sm86)")
        if vllm_config.kernel_config.enable_jit_warmup:
            # The layer registers JIT warmups of Triton kernels whose IR names e4m3, which
            # Triton refuses below sm_89 (fused_inv_rope_fp8_quant, fused_indexer_q...).
            init_logger("vllm_ampere").info_once(
                "DeepSeek-V4 on sm_%d%d: JIT kernel warmup disabled (its kernels are Hopper FP8 "
                "ones; vllm_ampere's attention path does not use them)", capability.major, capability.minor)
            vllm_config.kernel_config.enable_jit_warmup = False
        from vllm_ampere.attention.backend import DeepseekV4AmpereAttention

        return DeepseekV4AmpereAttention

    return select_dsv4_attn_cls_ampere


PATCH = Patch(
    name="attn_select_dsv4_class",
    target="vllm.models.deepseek_v4.nvidia.model:_select_dsv4_attn_cls",
    signature="(vllm_config: vllm.config.vllm.VllmConfig) -> "
    "type[vllm.models.deepseek_v4.attention.DeepseekV4Attention]",
    why="On CUDA the DeepSeek-V4 decoder layer takes its attention class from this function, "
    "which returns the FlashMLA (sm90a/sm100) or FlashInfer class on every GPU; their backend "
    "declares capability 9/10 and their kernels do not run on sm80/sm86. Below sm_80 nothing "
    "can run and the failure would come much later from a kernel launch.",
    how="Capability < 8.0: raises UnsupportedGPUError naming the GPU. Capability 8.x: returns "
    "vllm_ampere.attention.backend.DeepseekV4AmpereAttention (rejecting an explicit non-FlashMLA "
    "--attention-backend) and turns off JIT kernel warmup, whose DeepSeek-V4 kernels are FP8 "
    "Triton kernels Triton refuses below sm_89. Other GPUs: the stock choice.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="vLLM ships an sm80 DeepSeek-V4 sparse-MLA backend and selects it itself.",
    replace=_replace,
)
