"""What vllm_ampere.register() installs. Imported lazily, inside vLLM's plugin loading."""

from __future__ import annotations

import logging
import os

from vllm.logger import init_logger

from vllm_ampere import pins

logger = init_logger("vllm_ampere")


def _log_through_vllm() -> None:
    """Send our loggers (`vllm_ampere.*`) wherever vLLM's go, at vLLM's level.

    vLLM configures only its `vllm` logger tree, and does so per process, sometimes after
    plugins load (vllm/logger.py, configure_logging). Making `vllm` the parent of our root
    logger lets our records follow whatever configuration vLLM applies later.
    """
    logging.getLogger("vllm_ampere").parent = logging.getLogger("vllm")


def register_all() -> None:
    _log_through_vllm()
    import vllm
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, register_quantization_config

    from vllm_ampere.patches import all_patches
    from vllm_ampere.quant.config import Dsv4IntConfig

    if vllm.__version__ != pins.VLLM_VERSION:
        logger.warning(
            "vllm_ampere was checked against vLLM %s but vLLM %s is installed; patches refuse "
            "to install where their targets moved", pins.VLLM_VERSION, vllm.__version__)
    if "dsv4_int" not in QUANTIZATION_METHODS:
        register_quantization_config("dsv4_int")(Dsv4IntConfig)
    installed, skipped = [], []
    for patch in all_patches():
        (installed if patch.apply() else skipped).append(patch.name)
    logger.info(
        "vllm_ampere plugin loaded in pid %d: quantization dsv4_int registered; patches "
        "installed: %s%s", os.getpid(), ", ".join(installed) or "none",
        f" (already installed or not needed here: {', '.join(skipped)})" if skipped else "")
