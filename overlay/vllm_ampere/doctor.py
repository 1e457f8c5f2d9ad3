"""`vllm-ampere doctor`: is this machine ready to serve dsv4_int, and which kernels would run."""

from __future__ import annotations

import json
from pathlib import Path

HELP = "report the vLLM pin, patches, compiled extensions, GPU and the kernel paths that would run"


def add_arguments(parser) -> None:
    parser.add_argument("--model", type=Path, help="a dsv4_int checkpoint folder: read its IMMA flag")


def run(args) -> int:
    import torch
    import vllm

    from vllm_ampere import pins, register
    from vllm_ampere.flags import ImmaDecision, read_imma_flag, select_kernel_paths
    from vllm_ampere.patches import all_patches
    from vllm_ampere.patching import PatchTargetMoved

    ok = True
    print("vllm-ampere-overlay doctor")
    same = vllm.__version__ == pins.VLLM_VERSION
    ok &= same
    print(f"vLLM {vllm.__version__} (pinned {pins.VLLM_VERSION}): {'ok' if same else 'MISMATCH'}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})")

    register()
    print("patches:")
    patches = all_patches()
    for patch in patches:
        if not patch.needed():
            print(f"  {patch.name}: not needed in this process ({', '.join(patch.processes)})")
            continue
        try:
            patch.check()
            state = "installed" if patch.is_applied() else "NOT INSTALLED"
            ok &= state == "installed"
        except PatchTargetMoved as e:
            state, ok = f"TARGET MOVED: {e}", False
        print(f"  {patch.name}: {state}")
    if not patches:
        print("  (none in this release)")

    from vllm_ampere.ops import extension_error

    c_error, mla_error = extension_error("_C"), extension_error("_flashmla_C")
    have_c, have_mla = c_error is None, mla_error is None
    print(f"extension vllm_ampere._C (W8A16 GEMM): {c_error or 'built'}")
    print(f"extension vllm_ampere._flashmla_C (sparse MLA): {mla_error or 'built'}")

    capability = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        capability = major * 10 + minor
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{capability})")
    else:
        print("GPU: none (no CUDA device visible): dsv4_int runs its torch reference paths, "
              "for tests and the CPU demo")

    if args.model:
        imma = read_imma_flag(json.loads((args.model / "config.json").read_text()))
    else:
        imma = ImmaDecision(False, "no --model given: IMMA assumed off")
    print("kernel paths:")
    for line in select_kernel_paths(imma, capability, have_c, have_mla).lines():
        print(f"  {line}")
    print("result: " + ("ready" if ok else "PROBLEMS above"))
    return 0 if ok else 1
