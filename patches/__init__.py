"""The patchset: one module per change to stock vLLM, each defining `PATCH` (a Patch record).

Installed as `vllm_ampere.patches`. `all_patches()` finds every module here, so adding a file is
all it takes to add a patch; README.md in this folder is generated from the records
(`python -m vllm_ampere.patches > patches/README.md`) and a test keeps it in step.
"""

from __future__ import annotations

import importlib
import pkgutil

from vllm_ampere.patching import Patch


def all_patches() -> list[Patch]:
    patches = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        patch = getattr(module, "PATCH", None)
        if not isinstance(patch, Patch):
            raise TypeError(f"patches/{info.name}.py must define PATCH = Patch(...)")
        if patch.name != info.name:
            raise ValueError(f"patches/{info.name}.py: PATCH.name is {patch.name!r}, expected {info.name!r}")
        patches.append(patch)
    return patches


def render_markdown(patches: list[Patch]) -> str:
    lines = [
        "# The patchset",
        "",
        "Generated from the `PATCH` records in this folder by `python -m vllm_ampere.patches`;",
        "do not edit by hand. Each patch refuses to install when its target moved.",
        "",
    ]
    if not patches:
        lines.append("No patches yet.")
    for p in patches:
        lines += [
            f"## {p.name}",
            "",
            f"- **target**: `{p.target}`" + (f" `{p.signature}`" if p.signature else ""),
            f"- **why**: {p.why}",
            f"- **how**: {p.how}",
            f"- **checked against**: vLLM {p.vllm_checked}",
            f"- **processes**: {', '.join(p.processes)}",
            f"- **remove when**: {p.remove_when}",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"
