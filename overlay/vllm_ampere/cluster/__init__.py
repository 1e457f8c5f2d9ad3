"""Cluster deployment of DeepSeek-V4-Flash dsv4_int on RTX 3090 nodes (PP across nodes, Ray).

description: the small cluster description operators write (nodes, GPUs, context).
model:       DeepSeek-V4-Flash's dimensions and the dsv4_int byte size of every layer.
memory:      per-stage memory (weights, KV caches, activations, headroom) at a context length.
partition:   VLLM_PP_LAYER_PARTITION for the 43 layers over N stages.
lmcache:     the LMCache MP server sidecar: topology rules, command, health check.
render:      the `ray start` lines, `vllm serve` line, environment and kv-transfer-config.
command:     `vllm-ampere cluster render|launch|check`.
"""
