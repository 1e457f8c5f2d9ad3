"""`dsv4_int` as a vLLM quantization method (registered by vllm_ampere.register()).

Imports vLLM: only register() and code running inside vLLM import this module.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import RoutedExperts
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from vllm_ampere.flags import ImmaDecision, KernelPaths, LinearPath, read_imma_flag, select_kernel_paths
from vllm_ampere.quant.layers import LayerKind, Scheme, classify
from vllm_ampere.quant.linear_w8a16 import Dsv4Int8LinearMethod
from vllm_ampere.quant.moe_w4a16 import Dsv4Int4MoEMethod
from vllm_ampere.quant.schema import QuantizationConfig as Schema

logger = init_logger(__name__)


class Dsv4IntConfig(QuantizationConfig):
    """INT4 W4A16 routed experts + INT8 W8A16 linears (SPEC-dsv4_int.md).

    `imma` carries the IMMA decision; vLLM pickles this object into every worker, so the
    decision reaches them with it.
    """

    def __init__(self, schema: Schema, imma: ImmaDecision):
        super().__init__()
        self.schema = schema
        self.imma = imma

    def __repr__(self) -> str:
        return (f"Dsv4IntConfig(scale_mode={self.schema.scale_mode}, "
                f"dense={self.schema.dense_strategy}, {self.imma})")

    @classmethod
    def get_name(cls) -> str:
        return "dsv4_int"

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        return [torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        # Marlin INT4 MoE, cp.async and bf16 mma.sync all need sm_80 (Ampere).
        return 80

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # read from config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Dsv4IntConfig":
        return cls(Schema.parse(config), read_imma_flag({"quantization_config": config}))

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None):
        # The top-level IMMA flag lives outside quantization_config: read it from the HF config.
        if hf_config is not None:
            self.imma = read_imma_flag(hf_config.to_dict())
        logger.info_once("dsv4_int: %s", self.imma)

    def kernel_paths(self) -> KernelPaths:
        """This process's kernel paths (decided in each process: workers may differ in GPU)."""
        if getattr(self, "_paths", None) is None:
            from vllm.platforms import current_platform

            from vllm_ampere.ops import extension_available

            capability = current_platform.get_device_capability() if current_platform.is_cuda() else None
            self._paths = select_kernel_paths(
                self.imma, None if capability is None else capability.to_int(),
                extension_available("_C"), extension_available("_flashmla_C"), self.schema.dense_strategy)
            if self._paths.linear is LinearPath.REFUSED:
                raise RuntimeError(f"dsv4_int is refused on this GPU: {'; '.join(self._paths.reasons)}")
        return self._paths

    def __getstate__(self) -> dict[str, Any]:
        # The kernel paths depend on the process's GPU; the decision inputs travel, not the result.
        return {k: v for k, v in self.__dict__.items() if k != "_paths"}

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, RoutedExperts):
            kind = LayerKind.ROUTED_EXPERTS
        elif isinstance(layer, LinearBase):
            kind = LayerKind.LINEAR
        else:
            return None
        scheme = classify(kind, prefix)
        if scheme is Scheme.UNQUANTIZED:
            return UnquantizedLinearMethod() if kind is LayerKind.LINEAR else None
        if scheme is Scheme.EXPERTS_W4A16:
            return Dsv4Int4MoEMethod(layer.moe_config, self.kernel_paths(), prefix)
        return Dsv4Int8LinearMethod(self.schema.dense_strategy, self.kernel_paths(), prefix)
