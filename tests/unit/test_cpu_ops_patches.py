"""The cpu_* patch records against the pinned vLLM: targets and signatures, and the tripwire of
the c1a/c2a tile-scheduler fix."""

from __future__ import annotations

import pytest

from vllm_ampere.patches import all_patches

CPU_PATCHES = [p for p in all_patches() if p.name.startswith("cpu_")]


@pytest.mark.parametrize("patch", CPU_PATCHES, ids=lambda p: p.name)
def test_target_and_signature_match_pinned_vllm(patch):
    patch.check()


def test_tripwire_stock_cpu_tile_scheduler_still_lacks_c1a_c2a():
    """Fails once the pinned vLLM returns every layer type: then drop the patch."""
    patch = next(p for p in CPU_PATCHES if p.name == "cpu_build_tile_scheduler_keys")
    stock = patch.original()
    assert {"c1a", "c2a"} - set(stock(None, 1)), "vLLM fixed build_tile_scheduler: remove the patch"
    assert patch.needed()
    fixed = patch.replace(stock)
    assert fixed(None, 3) == dict.fromkeys(("swaonly", "c4a", "c128a", "c1a", "c2a"))
