"""The IMMA flag, and the one answer to "which kernel paths does this process take".

A dsv4_int checkpoint may carry `schema.IMMA_FLAG: true`, at the top level of config.json
(where the seed card puts it) or inside `quantization_config` (where the AppMana fork reads
it). When true, the INT8 tensor-core (IMMA, mma.s8) paths may run: Marlin MoE with INT8
activations (W4A8) and the INT8 indexer. The decision is stored on the quantization config
object (`Dsv4IntConfig.imma`), which vLLM pickles into every worker; nothing here keeps
process-global state.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import Any, Mapping

from vllm_ampere.quant.schema import IMMA_FLAG

# Debugging override: "1"/"true" forces the IMMA paths on, "0"/"false" off.
IMMA_ENV = "VLLM_AMPERE_IMMA"
_ENV_VALUES = {"1": True, "true": True, "0": False, "false": False}


class ImmaFlagError(ValueError):
    """The IMMA flag has a value that is not a JSON boolean, or its two places disagree."""


@dataclass(frozen=True)
class ImmaDecision:
    enabled: bool
    source: str  # where the decision came from, for logs and `vllm-ampere doctor`

    def __str__(self) -> str:
        return f"IMMA {'on' if self.enabled else 'off'} ({self.source})"


def _checked(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ImmaFlagError(
            f"{where}: {IMMA_FLAG!r} must be a JSON boolean (true/false), got {value!r}"
        )
    return value


def read_imma_flag(config: Mapping[str, Any], env: Mapping[str, str] | None = None) -> ImmaDecision:
    """Decide IMMA from a config.json dict (top level and `quantization_config`) and the env."""
    env = os.environ if env is None else env
    found: dict[str, bool] = {}
    if IMMA_FLAG in config:
        found["config.json"] = _checked(config[IMMA_FLAG], "config.json")
    quant = config.get("quantization_config") or {}
    if isinstance(quant, Mapping) and IMMA_FLAG in quant:
        found["quantization_config"] = _checked(quant[IMMA_FLAG], "config.json quantization_config")
    if len(set(found.values())) > 1:
        raise ImmaFlagError(
            f"{IMMA_FLAG!r} is {found['config.json']} at the top level of config.json but "
            f"{found['quantization_config']} inside quantization_config; make them agree"
        )
    raw_env = env.get(IMMA_ENV)
    if raw_env is not None:
        if raw_env.strip().lower() not in _ENV_VALUES:
            raise ImmaFlagError(f"{IMMA_ENV}={raw_env!r}: expected one of 1, 0, true, false")
        return ImmaDecision(_ENV_VALUES[raw_env.strip().lower()], f"{IMMA_ENV}={raw_env} overrides the checkpoint")
    if found:
        enabled = next(iter(found.values()))
        return ImmaDecision(enabled, f"checkpoint flag in {' and '.join(found)}")
    return ImmaDecision(False, "checkpoint has no IMMA flag")


class MoePath(str, enum.Enum):
    """How routed experts run (a str, so logs and `doctor` print it as is)."""

    REFERENCE = "torch reference (dequantize, per-expert matmul)"
    MARLIN_W4A16 = "Marlin MoE W4A16"
    MARLIN_W4A8 = "Marlin MoE W4A8 (INT8 activations)"
    REFUSED = "refused"


class LinearPath(str, enum.Enum):
    """How INT8 linears run."""

    REFERENCE = "torch reference (dequantize, matmul)"
    OURS = "vllm_ampere W8A16 GEMM (AllSpark layout)"
    MARLIN = "vLLM Marlin W8A16 (uint8b128, channel)"
    DEQUANT_BF16 = "dequantized once to BF16 (block scales)"
    REFUSED = "refused"


@dataclass(frozen=True)
class KernelPaths:
    """Which implementation each dsv4_int op takes in this process, and why."""

    moe: MoePath
    linear: LinearPath
    attention: str
    reasons: tuple[str, ...]

    def lines(self) -> list[str]:
        return [f"routed experts: {self.moe.value}", f"INT8 linears: {self.linear.value}",
                f"sparse MLA: {self.attention}"] + [f"  because {r}" for r in self.reasons]


def select_kernel_paths(imma: ImmaDecision, capability: int | None,
                        have_c: bool, have_flashmla: bool,
                        dense_strategy: str = "channel") -> KernelPaths:
    """The single decision table for kernel paths.

    capability: CUDA compute capability as an int (86 for sm_86), None without a CUDA GPU.
    have_c / have_flashmla: whether vllm_ampere._C / vllm_ampere._flashmla_C imported.
    dense_strategy: the checkpoint's INT8 scale layout, "channel" or "block".
    """
    reasons = [str(imma)]
    if capability is None:
        reasons.append("no CUDA GPU: every dsv4_int op runs its torch reference")
        return KernelPaths(MoePath.REFERENCE, LinearPath.REFERENCE, "torch reference", tuple(reasons))
    if capability < 80:
        reasons.append(f"sm_{capability} is below sm_80: dsv4_int is refused on this GPU "
                       "(Marlin INT4 MoE, cp.async and BF16 mma.sync need Ampere)")
        return KernelPaths(MoePath.REFUSED, LinearPath.REFUSED, "refused", tuple(reasons))
    # vLLM 0.32.0's Marlin MoE takes INT8 activations (fused_marlin_moe input_dtype=int8,
    # gptq_marlin_moe_repack is_a_8bit, marlin_act_int8_process_scales), so IMMA maps to W4A8.
    moe = MoePath.MARLIN_W4A8 if imma.enabled else MoePath.MARLIN_W4A16
    if dense_strategy == "block":
        linear = LinearPath.DEQUANT_BF16
        reasons.append("block-scaled INT8 linears: both W8A16 GEMMs here take per-channel scales")
    elif 80 <= capability < 90 and have_c:
        linear = LinearPath.OURS
    else:
        linear = LinearPath.MARLIN
        reasons.append("vllm_ampere._C not built" if not have_c
                       else f"our W8A16 GEMM targets sm80-89, this GPU is sm_{capability}")
    if 80 <= capability < 90:
        attention = "vllm_ampere FlashMLA (sm80)" if have_flashmla else "torch reference sparse MLA"
        if not have_flashmla:
            reasons.append("vllm_ampere._flashmla_C not built")
        reasons.append("the sm8x compressor and indexer are torch code that reads the GPU from the host: "
                       "vLLM runs DeepSeek-V4 without CUDA graphs here (attention/backend.py)")
    else:
        attention = "stock vLLM FlashMLA"
    return KernelPaths(moe, linear, attention, tuple(reasons))
