"""The dsv4_int quantization_config schema (SPEC-dsv4_int.md section 2)."""

import copy
import json

import pytest

from vllm_ampere.quant.schema import IMMA_FLAG, Dsv4IntConfigError, QuantizationConfig

# The quantization_config exactly as the spec shows it for the published checkpoint.
PUBLISHED = json.loads("""
{
  "quant_method": "dsv4_int",
  "format": "int_packed",
  "config_groups": {
    "experts_w4a16": {"weights": {"num_bits": 4, "type": "int", "symmetric": true,
                                  "group_size": 32, "strategy": "group", "scale_mode": "mse"}},
    "linears_w8a16": {"weights": {"num_bits": 8, "type": "int", "symmetric": true,
                                  "strategy": "channel"}}
  },
  "ignore": ["...tensors deliberately left in BF16..."],
  "conversion": {"...": "provenance: tool version, source index hash, scale_mode, divisor grid"}
}
""")


def test_published_config_parses():
    cfg = QuantizationConfig.parse(PUBLISHED)
    assert cfg.scale_mode == "mse"
    assert cfg.dense_strategy == "channel"
    assert cfg.imma is None
    assert cfg.to_json_dict() == PUBLISHED


def test_imma_flag_inside_round_trips():
    raw = dict(PUBLISHED, **{IMMA_FLAG: True})
    cfg = QuantizationConfig.parse(raw)
    assert cfg.imma is True
    assert cfg.to_json_dict()[IMMA_FLAG] is True


def test_defaults_are_the_spec():
    assert QuantizationConfig().to_json_dict() == dict(PUBLISHED, ignore=[], conversion={})


@pytest.mark.parametrize("scale_mode", ["absmax7", "absmax8"])
def test_other_scale_modes(scale_mode):
    raw = copy.deepcopy(PUBLISHED)
    raw["config_groups"]["experts_w4a16"]["weights"]["scale_mode"] = scale_mode
    assert QuantizationConfig.parse(raw).scale_mode == scale_mode


def test_block_strategy():
    raw = copy.deepcopy(PUBLISHED)
    raw["config_groups"]["linears_w8a16"]["weights"]["strategy"] = "block"
    assert QuantizationConfig.parse(raw).dense_strategy == "block"


def _mutate(path, value):
    raw = copy.deepcopy(PUBLISHED)
    node = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return raw


@pytest.mark.parametrize(
    "path, value, named",
    [
        (("quant_method",), "fp8", "quant_method"),
        (("format",), "pack-quantized", "format"),
        (("config_groups", "experts_w4a16", "weights", "num_bits"), 8, "experts_w4a16.weights.num_bits"),
        (("config_groups", "experts_w4a16", "weights", "group_size"), 128, "group_size"),
        (("config_groups", "experts_w4a16", "weights", "scale_mode"), "minmax", "scale_mode"),
        (("config_groups", "experts_w4a16", "weights", "symmetric"), False, "symmetric"),
        (("config_groups", "linears_w8a16", "weights", "strategy"), "tensor", "linears_w8a16.weights.strategy"),
        (("config_groups", "linears_w8a16", "weights", "zero_point"), 0, "zero_point"),
        (("config_groups", "attention_w8a8"), {}, "attention_w8a8"),
        (("kv_cache_scheme",), {"num_bits": 8}, "kv_cache_scheme"),
        (("ignore",), "lm_head", "ignore"),
        ((IMMA_FLAG,), "true", IMMA_FLAG),
        ((IMMA_FLAG,), 1, IMMA_FLAG),
    ],
)
def test_bad_field_is_named(path, value, named):
    with pytest.raises(Dsv4IntConfigError, match=named.replace(".", r"\.")):
        QuantizationConfig.parse(_mutate(path, value))


def test_not_an_object():
    with pytest.raises(Dsv4IntConfigError, match="must be an object"):
        QuantizationConfig.parse(["dsv4_int"])
