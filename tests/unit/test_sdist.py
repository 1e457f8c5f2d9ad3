"""The source distribution (what `pip install vllm-ampere-overlay` builds from where no wheel
fits) carries every CUDA source and header, wherever it was made."""

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sdist_carries_the_cuda_sources(tmp_path):
    # Made on this CPU machine, where setup.py declares no extension.
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, check=True,
                   capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = subprocess.run(["git", "ls-files", "csrc", "flashmla_ampere"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    assert tracked and any(p.endswith(".cu") for p in tracked)
    assert sorted(set(tracked) - members) == []
    assert {"setup.py", "overlay/vllm_ampere/pins.py"} <= members
