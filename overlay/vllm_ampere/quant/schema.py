"""The `quantization_config` of a dsv4_int checkpoint, as a validated schema.

The fields of these models are exactly what lands in config.json (SPEC-dsv4_int.md section 2);
the converter writes `QuantizationConfig.model_dump(...)` and the runtime reads it back through
`QuantizationConfig.parse(...)`. Unknown fields are rejected, with their path in the message.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# Written by the AppMana fork's checkpoints (SPEC section 2); read by vllm_ampere.flags.
IMMA_FLAG = "__experimental_enable_imma_from_https://github.com/appMana/forks-vllm-ampere"

ScaleMode = Literal["mse", "absmax7", "absmax8"]
DenseStrategy = Literal["channel", "block"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class ExpertWeights(_Strict):
    num_bits: Literal[4] = 4
    type: Literal["int"] = "int"
    symmetric: Literal[True] = True
    group_size: Literal[32] = 32
    strategy: Literal["group"] = "group"
    scale_mode: ScaleMode = "mse"


class LinearWeights(_Strict):
    num_bits: Literal[8] = 8
    type: Literal["int"] = "int"
    symmetric: Literal[True] = True
    strategy: DenseStrategy = "channel"


class ExpertsGroup(_Strict):
    weights: ExpertWeights = ExpertWeights()


class LinearsGroup(_Strict):
    weights: LinearWeights = LinearWeights()


class ConfigGroups(_Strict):
    experts_w4a16: ExpertsGroup = ExpertsGroup()
    linears_w8a16: LinearsGroup = LinearsGroup()


class QuantizationConfig(_Strict):
    quant_method: Literal["dsv4_int"] = "dsv4_int"
    format: Literal["int_packed"] = "int_packed"
    config_groups: ConfigGroups = ConfigGroups()
    # Tensor-name patterns deliberately left in BF16 (informational; SPEC section 4 decides).
    ignore: list[str] = Field(default_factory=list)
    # Provenance written by the converter (tool version, source index hash, grid, ...).
    # Free-form on read: published checkpoints carry their own provenance keys.
    conversion: dict[str, Any] = Field(default_factory=dict)
    imma: bool | None = Field(default=None, alias=IMMA_FLAG)

    # strict: the IMMA flag (and every other field) must be a real JSON boolean/number/string.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    @property
    def scale_mode(self) -> ScaleMode:
        return self.config_groups.experts_w4a16.weights.scale_mode

    @property
    def dense_strategy(self) -> DenseStrategy:
        return self.config_groups.linears_w8a16.weights.strategy

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "QuantizationConfig":
        """Validate a config.json `quantization_config`; errors name every offending field."""
        if not isinstance(raw, dict):
            raise Dsv4IntConfigError(f"quantization_config must be an object, got {type(raw).__name__}")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            problems = "; ".join(
                f"quantization_config.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                f" (got {err.get('input')!r})" for err in e.errors()
            )
            raise Dsv4IntConfigError(f"invalid dsv4_int {problems}") from None

    def to_json_dict(self) -> dict[str, Any]:
        """What the converter writes into config.json (the IMMA flag only when set)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class Dsv4IntConfigError(ValueError):
    """A dsv4_int quantization_config that does not match SPEC-dsv4_int.md."""
