"""vllm-ampere-overlay: serve DeepSeek-V4-Flash dsv4_int checkpoints on Ampere with stock vLLM.

vLLM calls `register()` through its `vllm.general_plugins` entry point in every process it
starts (API server, engine core, each worker, the model-registry subprocess), sometimes more
than once. Importing this package must stay cheap: everything heavy is imported inside
register(), after vLLM has finished resolving its platform.
"""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """Install the dsv4_int quantization method and the patchset into this process (idempotent)."""
    global _registered
    if _registered:
        return
    from vllm_ampere._register import register_all

    register_all()
    _registered = True
