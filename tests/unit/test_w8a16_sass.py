"""The W8A16 decode kernel keeps its whole weight ring in flight: checked in the SASS, no GPU needed.

Decode speed is bytes in flight per SM (Little's law: DRAM bandwidth x latency). The kernel holds
kStages x kStageTiles 16-byte weight loads per lane in registers (w8a16_config.h). Its first design
rotated two register buffers by assignment; nvcc compiled that to register copies inside the
streaming loop, and a copy waits for its load, so only one chunk was ever in flight (measured on
the H200: at most 50% of copy bandwidth). This test reads each compiled gemm kernel's SASS and
fails if (a) the streaming loop copies a register that a weight load wrote, (b) the ring is not
kStages x kStageTiles distinct 128-bit loads, or (c) fewer loads than the ring are issued before
the first tensor-core product. It fails on the first design (checked by hand) and passes on this
one; speed itself is measured by benchmarks/bench_w8a16.py on a GPU.
"""

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cuda_compile import nvcc_command

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc" / "w8a16"
SOURCES = ("w8a16_gemm_bf16.cu", "w8a16_gemm_fp16.cu")
ARCHS = ("sm_80", "sm_86")
STREAM_LOAD = re.compile(r"LDG\.E\.NA\S*\.128\S* (R\d+)")  # ld.global.nc.L1::no_allocate .v4
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BACK_BRANCH = re.compile(r"\bBRA (0x[0-9a-f]+)")
REGISTER_COPY = re.compile(r"^(?:@!?P\d+ )?(?:MOV|IMAD\.MOV)\S* R\d+, (?:RZ, RZ, )?-?(R\d+)")


def cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the copy Triton bundles (the CI toolkit has none)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("triton")
    if spec and spec.submodule_search_locations:
        bundled = Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    return None


def config_constant(name: str) -> int:
    text = (CSRC / "w8a16_config.h").read_text()
    return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


def kernels(sass: str) -> dict[str, list[tuple[int, str]]]:
    """Function name -> [(address, instruction)] from cuobjdump -sass output."""
    parts = re.split(r"\n\s*Function : (\S+)", sass)
    return {
        name: [(int(a, 16), ins) for a, ins in INSTRUCTION.findall(body)]
        for name, body in zip(parts[1::2], parts[2::2])
    }


def stream_registers(instructions) -> set[str]:
    """The 4 registers each 128-bit weight load writes."""
    regs = set()
    for _, ins in instructions:
        if m := STREAM_LOAD.search(ins):
            base = int(m.group(1)[1:])
            regs.update(f"R{base + i}" for i in range(4))
    return regs


def streaming_loop(instructions) -> list[tuple[int, str]]:
    """The body of the backward branch whose body issues weight loads (the k loop)."""
    for addr, ins in instructions:
        m = BACK_BRANCH.search(ins)
        if m and int(m.group(1), 16) < addr:
            body = [(a, i) for a, i in instructions if int(m.group(1), 16) <= a <= addr]
            if any(STREAM_LOAD.search(i) for _, i in body):
                return body
    return []


def check_kernel(instructions, ring_loads: int) -> list[str]:
    """Problems of one kernel's SASS (empty when the ring is kept in flight)."""
    loop = streaming_loop(instructions)
    if not loop:
        return ["no streaming loop with weight loads found"]
    problems = []
    ring = stream_registers(loop)
    if len(ring) != 4 * ring_loads:
        problems.append(f"the loop loads weights into {len(ring)} registers, expected {4 * ring_loads}")
    copies = [i for _, i in loop if (m := REGISTER_COPY.search(i)) and m.group(1) in ring]
    if copies:
        problems.append(f"the loop copies in-flight weight registers ({len(copies)}x, e.g. {copies[0]!r})")
    first_mma = next(n for n, (_, i) in enumerate(instructions) if "HMMA" in i)
    issued = sum(1 for _, i in instructions[:first_mma] if STREAM_LOAD.search(i))
    if issued < ring_loads:
        problems.append(f"{issued} weight loads before the first HMMA, expected the ring's {ring_loads}")
    return problems


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: CUDA toolkit absent")
@pytest.mark.skipif(cuobjdump() is None, reason="no cuobjdump (CUDA toolkit or Triton's copy) to read SASS")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES)
def test_decode_kernel_keeps_the_ring_in_flight(source: str, arch: str, tmp_path: Path):
    cubin = tmp_path / "k.cubin"
    subprocess.run(nvcc_command(CSRC / source, arch, "-cubin", "-o", str(cubin)), check=True, capture_output=True,
                   timeout=600)
    sass = subprocess.run([cuobjdump(), "-sass", str(cubin)], check=True, capture_output=True, text=True).stdout
    gemm = {name: ins for name, ins in kernels(sass).items() if "gemm_kernel" in name}
    assert len(gemm) == 3, f"expected the 3 token-tile instantiations, found {sorted(gemm)}"
    ring_loads = config_constant("kStages") * config_constant("kStageTiles")
    problems = {name: p for name, ins in gemm.items() if (p := check_kernel(ins, ring_loads))}
    assert not problems, problems


def test_checker_flags_a_copied_ring():
    """The first design's pattern: loads into R16..R19, copied out at the top of the loop."""
    sass = [
        (0x100, "@!P0 LDG.E.NA.LTC256B.128.CONSTANT R16, [R2.64]"),
        (0x110, "IMAD.MOV.U32 R40, RZ, RZ, R16"),
        (0x120, "@!P0 LDG.E.NA.LTC256B.128.CONSTANT R16, [R2.64+0x200]"),
        (0x130, "HMMA.16816.F32.BF16 R48, R40, R12, R48"),
        (0x140, "@P1 BRA 0x110"),
    ]
    problems = check_kernel(sass, ring_loads=1)
    assert any("copies in-flight" in p for p in problems), problems
    in_place = [
        (0x100, "@!P0 LDG.E.NA.LTC256B.128.CONSTANT R16, [R2.64]"),
        (0x110, "HMMA.16816.F32.BF16 R48, R16, R12, R48"),
        (0x120, "@!P0 LDG.E.NA.LTC256B.128.CONSTANT R16, [R2.64+0x200]"),
        (0x130, "@P1 BRA 0x110"),
    ]
    assert check_kernel(in_place, ring_loads=1) == []
    assert any("before the first HMMA" in p for p in check_kernel(in_place, ring_loads=2))
