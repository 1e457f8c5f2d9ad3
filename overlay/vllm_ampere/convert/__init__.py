"""Native DeepSeek-V4-Flash (FP8 + MXFP4) -> dsv4_int (INT8 W8A16 + INT4 W4A16) converter.

Library: `convert(src, dst, ConvertOptions(...))`; tiny native checkpoints for tests and demos:
`make_tiny(dst, seed=0, dtype="native"|"bf16")`. CLI: `vllm-ampere convert`, `vllm-ampere make-tiny`.
"""

from .converter import ConvertOptions, ConvertResult, convert
from .errors import ConversionError
from .tiny import make_tiny, tiny_config

__all__ = ["ConversionError", "ConvertOptions", "ConvertResult", "convert", "make_tiny", "tiny_config"]
