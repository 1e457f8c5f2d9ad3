"""Name the checkpoint tensor when a dsv4_int checkpoint does not fit DeepSeek-V4's CPU model."""

from vllm_ampere.patches._load_weights import load_weights_patch

PATCH = load_weights_patch("dsv4_int_cpu_load_weights", "vllm.models.deepseek_v4.cpu.model", "CPU")
