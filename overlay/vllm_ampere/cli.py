"""`vllm-ampere`: the overlay's command line. Subcommands are imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module defining HELP, add_arguments(parser) and run(args) -> int
SUBCOMMANDS = {
    "doctor": "vllm_ampere.doctor",
    "convert": "vllm_ampere.convert.cli",
    "make-tiny": "vllm_ampere.convert.tiny",
    "bench": "vllm_ampere.bench.command",
    "cluster": "vllm_ampere.cluster.command",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="vllm-ampere", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Import only the chosen subcommand's module (heavy ones pull in torch or vLLM).
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, module_name in SUBCOMMANDS.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.HELP))
        else:
            sub.add_parser(name, help=f"(see vllm-ampere {name} --help)")
    args = parser.parse_args(argv)
    return importlib.import_module(SUBCOMMANDS[args.command]).run(args)


if __name__ == "__main__":
    sys.exit(main())
