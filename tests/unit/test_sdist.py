"""The source distribution (what `pip install vllm-ampere-overlay` builds from where no wheel
fits) carries every CUDA source and header, wherever it was made."""

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_sdist_carries_the_cuda_sources(tmp_path):
    # From a copy of the tree as a fresh clone has it: a local *.egg-info/SOURCES.txt (left by an
    # editable install) would add its files to the sdist and hide a missing MANIFEST.in line.
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.split()
    src = tmp_path / "src"
    for f in files:
        if (ROOT / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, src / f)
    # Made on this CPU machine, where setup.py declares no extension.
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=src, check=True,
                   capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        members = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tracked = [f for f in files if f.startswith(("csrc/", "flashmla_ampere/"))]
    assert tracked and any(p.endswith(".cu") for p in tracked)
    assert sorted(set(tracked) - members) == []
    assert {"setup.py", "overlay/vllm_ampere/pins.py"} <= members
