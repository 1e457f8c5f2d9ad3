"""Give the DeepSeek-V4 CPU SWA metadata builder's tile-scheduler dict every layer-type key."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _layer_types() -> tuple[str, ...]:
    from vllm.v1.attention.backends.mla import sparse_swa

    return (sparse_swa._LAYER_TYPE_SWAONLY, sparse_swa._LAYER_TYPE_C4A, sparse_swa._LAYER_TYPE_C128A,
            sparse_swa._LAYER_TYPE_C1A, sparse_swa._LAYER_TYPE_C2A)


def _missing_keys(build_tile_scheduler) -> set[str]:
    # The stock CPU method ignores self and num_decode_tokens (it always returns Nones).
    return set(_layer_types()) - set(build_tile_scheduler(None, 1))


def _replace(build_tile_scheduler):
    @functools.wraps(build_tile_scheduler)
    def build_tile_scheduler_all_types(self, num_decode_tokens: int):
        plans = dict.fromkeys(_layer_types())
        plans.update(build_tile_scheduler(self, num_decode_tokens))
        return plans

    return build_tile_scheduler_all_types


def _needed() -> bool:
    return bool(_missing_keys(PATCH.original()))


PATCH = Patch(
    name="cpu_build_tile_scheduler_keys",
    target="vllm.models.deepseek_v4.cpu.cpu_mla:DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler",
    signature="(self, num_decode_tokens: int) -> dict[str, vllm.v1.attention.ops.flashmla.FlashMLASchedMeta | None]",
    why="The CPU builder returns only the swaonly/c4a/c128a keys, but the shared "
    "DeepseekSparseSWAMetadataBuilder.build() also reads c1a and c2a, so the first request on "
    "CPU fails with KeyError: 'c1a'.",
    how="Starts from a dict with every layer type (swaonly, c4a, c128a, c1a, c2a) set to None "
    "(CPU never plans FlashMLA tiles) and overlays what the stock method returns.",
    vllm_checked="0.32.0",
    processes=("workers",),
    remove_when="DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler returns the c1a and "
    "c2a keys (tests/unit/test_cpu_ops_patches.py has the tripwire).",
    replace=_replace,
    needed=_needed,
)
