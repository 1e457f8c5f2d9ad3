"""The IMMA flag reader and the kernel path decision (vllm_ampere.flags)."""

import multiprocessing as mp

import pytest

from vllm_ampere.flags import (IMMA_ENV, ImmaDecision, ImmaFlagError, read_imma_flag,
                               select_kernel_paths)
from vllm_ampere.quant.schema import IMMA_FLAG

NO_ENV: dict[str, str] = {}


def test_absent_is_off():
    d = read_imma_flag({"quantization_config": {"quant_method": "dsv4_int"}}, NO_ENV)
    assert d == ImmaDecision(False, "checkpoint has no IMMA flag")


@pytest.mark.parametrize("value", [True, False])
def test_top_level(value):
    d = read_imma_flag({IMMA_FLAG: value, "quantization_config": {}}, NO_ENV)
    assert d.enabled is value and "config.json" in d.source


@pytest.mark.parametrize("value", [True, False])
def test_inside_quantization_config(value):
    d = read_imma_flag({"quantization_config": {IMMA_FLAG: value}}, NO_ENV)
    assert d.enabled is value and "quantization_config" in d.source


def test_both_places_agreeing():
    d = read_imma_flag({IMMA_FLAG: True, "quantization_config": {IMMA_FLAG: True}}, NO_ENV)
    assert d.enabled and "config.json and quantization_config" in d.source


def test_both_places_disagreeing():
    with pytest.raises(ImmaFlagError, match="make them agree"):
        read_imma_flag({IMMA_FLAG: True, "quantization_config": {IMMA_FLAG: False}}, NO_ENV)


@pytest.mark.parametrize("bad", ["true", 1, 0, None, "yes", [True]])
@pytest.mark.parametrize("where", ["top", "inside"])
def test_non_boolean_is_an_error_naming_the_value(bad, where):
    cfg = {IMMA_FLAG: bad} if where == "top" else {"quantization_config": {IMMA_FLAG: bad}}
    with pytest.raises(ImmaFlagError, match=f"got {bad!r}".replace("[", r"\[").replace("]", r"\]")):
        read_imma_flag(cfg, NO_ENV)


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("0", False), ("FALSE", False)])
def test_env_overrides(raw, expected):
    d = read_imma_flag({IMMA_FLAG: not expected}, {IMMA_ENV: raw})
    assert d.enabled is expected and IMMA_ENV in d.source


def test_bad_env_value():
    with pytest.raises(ImmaFlagError, match=IMMA_ENV):
        read_imma_flag({}, {IMMA_ENV: "maybe"})


def test_kernel_paths_table():
    on, off = ImmaDecision(True, "t"), ImmaDecision(False, "t")
    assert "reference" in select_kernel_paths(off, None, False, False).linear
    assert select_kernel_paths(off, 75, True, True).moe == "refused"
    sm86 = select_kernel_paths(on, 86, True, True)
    assert "W4A8" in sm86.moe and "vllm_ampere W8A16" in sm86.linear and "vllm_ampere FlashMLA" in sm86.attention
    assert any("without CUDA graphs" in r for r in sm86.reasons)
    sm80_bare = select_kernel_paths(off, 80, False, False)
    assert "W4A16" in sm80_bare.moe and "Marlin W8A16" in sm80_bare.linear
    assert any("_C not built" in r for r in sm80_bare.reasons)
    assert select_kernel_paths(off, 90, True, True).attention == "stock vLLM FlashMLA"


# --- the decision travels with the config object into a spawned process -------------------

def _child(cfg, queue):
    queue.put((type(cfg).__name__, cfg.imma))


def test_decision_survives_spawn():
    from transformers import PretrainedConfig

    from vllm_ampere.quant.config import Dsv4IntConfig

    cfg = Dsv4IntConfig.from_config({"quant_method": "dsv4_int"})
    assert cfg.imma.enabled is False
    # The top-level flag reaches the config through vLLM's maybe_update_config hook.
    hf_config = PretrainedConfig(**{IMMA_FLAG: True, "quantization_config": {"quant_method": "dsv4_int"}})
    cfg.maybe_update_config("tiny", hf_config=hf_config)
    assert cfg.imma.enabled is True
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(cfg, queue))
    proc.start()
    name, imma = queue.get(timeout=120)
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert name == "Dsv4IntConfig" and imma == cfg.imma and imma.enabled is True
