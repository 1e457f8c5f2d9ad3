"""patches/indexer_metadata_sm8x: the indexer's metadata builder asks DeepGEMM for a decode
schedule whenever the deep_gemm package imports, and the PyPI CUDA wheel vendors one that
imports on sm8x but refuses arch 8. On sm8x the builder's `has_deep_gemm` answers False.
Platform and capability are faked; the builder itself runs on a GPU only."""

import ast
import inspect

import pytest
from vllm.platforms import current_platform
from vllm.v1.attention.backends.mla import indexer

from vllm_ampere.patches import indexer_metadata_sm8x, indexer_native_decode_sm8x


def _patched(stock_answer: bool):
    return indexer_metadata_sm8x.PATCH.replace(lambda: stock_answer)


@pytest.mark.parametrize("major,minor,want", [(8, 0, False), (8, 6, False), (8, 9, False), (9, 0, True),
                                              (10, 0, True)])
def test_deepgemm_package_counts_only_off_sm8x(fake_cuda, major, minor, want):
    fake_cuda(major, minor)
    assert _patched(True)() is want
    assert _patched(False)() is False  # no package: no DeepGEMM anywhere


def test_cpu_platform_keeps_the_stock_answer():
    assert not current_platform.is_cuda()
    assert _patched(True)() is True and _patched(False)() is False


@pytest.mark.parametrize("major,minor", [(8, 0), (8, 6)])
def test_other_readers_answer_as_without_deepgemm(fake_cuda, monkeypatch, major, minor):
    """The module's other has_deep_gemm readers give the same answers on sm8x with the patch
    as stock vLLM gives there: only the schedule-metadata call changes."""
    fake_cuda(major, minor)
    # The stock native-decode answer (indexer_native_decode_sm8x may be installed in this process).
    monkeypatch.setattr(indexer, "_supports_native_decode", indexer_native_decode_sm8x.PATCH.original())

    def answers():
        return ([indexer._supports_native_decode(n) for n in (1, 2, 3, 4)],
                indexer._supports_varlen_paged_mqa_logits(), indexer._supports_flattened_device_query_lens())

    monkeypatch.setattr(indexer, "has_deep_gemm", lambda: True)
    stock = answers()
    monkeypatch.setattr(indexer, "has_deep_gemm", _patched(True))
    assert indexer.has_deep_gemm() is False
    assert answers() == stock == ([True, True, False, False], False, False)


def test_every_deepgemm_schedule_call_is_gated_by_the_patched_name():
    """Tripwire: each get_paged_mqa_logits_metadata call in the stock module sits under an `if`
    that calls has_deep_gemm(), the module-level name this patch replaces. If vLLM gates it on
    something else (is_deep_gemm_supported: the patch can go) or calls it ungated, this fails."""
    tree = ast.parse(inspect.getsource(indexer))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def gated(node) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.If) and any(
                    isinstance(n, ast.Call) and getattr(n.func, "id", None) == "has_deep_gemm"
                    for n in ast.walk(node.test)):
                return True
        return False

    calls = [n for n in ast.walk(tree)
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "get_paged_mqa_logits_metadata"]
    assert len(calls) == 2, f"expected build's and update_draft_decode_metadata's calls, found {len(calls)}"
    assert all(gated(c) for c in calls), [c.lineno for c in calls if not gated(c)]
