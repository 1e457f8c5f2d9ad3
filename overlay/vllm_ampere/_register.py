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


def _announce(msg: str, *args) -> None:
    """Log the once-per-process summary, also where vLLM has not configured logging yet.

    The API server loads plugins while it builds its CLI parser, before it configures the
    `vllm` logger (vllm/engine/arg_utils.py AsyncEngineArgs.add_cli_args, then
    configure_logging_from_args); a record sent then would be dropped. In that case this one
    line goes through a logger of its own, on vLLM's stream and level.
    """
    import sys

    import vllm.envs as envs

    if logging.getLogger("vllm").handlers or not envs.VLLM_CONFIGURE_LOGGING:
        logger.info(msg, *args)
        return
    early = logging.getLogger("vllm_ampere.announce")
    if not early.handlers:
        stream = sys.stdout if envs.VLLM_LOGGING_STREAM.endswith("stdout") else sys.stderr
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s",
                                               datefmt="%m-%d %H:%M:%S"))
        early.addHandler(handler)
        early.setLevel(envs.VLLM_LOGGING_LEVEL)
        early.propagate = False
    early.info(msg, *args)


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
    _announce(
        "vllm_ampere plugin loaded in pid %d: quantization dsv4_int registered; patches "
        "installed: %s%s", os.getpid(), ", ".join(installed) or "none",
        f" (already installed or not needed here: {', '.join(skipped)})" if skipped else "")
