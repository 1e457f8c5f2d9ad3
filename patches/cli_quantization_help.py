"""List the registered quantization methods, dsv4_int included, in `--quantization`'s help."""

from __future__ import annotations

import functools

from vllm_ampere.patching import Patch


def _replace(add_cli_args):
    @functools.wraps(add_cli_args)
    def add_cli_args_listing_methods(parser):
        parser = add_cli_args(parser)
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

        for action in parser._actions:
            if "--quantization" in action.option_strings:
                action.help = f"{action.help} Registered methods: {', '.join(QUANTIZATION_METHODS)}."
        return parser

    return add_cli_args_listing_methods


PATCH = Patch(
    name="cli_quantization_help",
    target="vllm.engine.arg_utils:EngineArgs.add_cli_args",
    signature="(parser: vllm.utils.argparse_utils.FlexibleArgumentParser) -> "
    "vllm.utils.argparse_utils.FlexibleArgumentParser",
    why="`--quantization` is typed `QuantizationMethods | str`, so argparse shows no choices and "
    "a user cannot see that dsv4_int is available (plugins load before the parser is built).",
    how="After the stock parser is built, appends the names in QUANTIZATION_METHODS (where "
    "register() put dsv4_int) to the help text; the accepted values do not change.",
    vllm_checked="0.32.0",
    processes=("API server / CLI",),
    remove_when="vLLM lists registered quantization methods in --quantization's help itself.",
    replace=_replace,
)
