"""The install is reproducible: every package in the environment is pinned in requirements.lock at the version
installed (torch aside: TORCH_SPEC picks it, with the CUDA/ROCm runtime wheels that come with a GPU build)."""

import re
import subprocess
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[1] / "requirements.lock"
NOT_LOCKED = re.compile(r"^(torch|hepml-dist|pip|setuptools|wheel|nvidia-.*|triton|pytorch-triton-rocm)$")


def frozen() -> list[str]:
    """`pip freeze` of this environment, from a fresh interpreter: in this process setuptools may have put its
    vendored packages (jaraco.*, more-itertools, ...) on sys.path, and they are not installed packages."""
    out = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [line for line in out.splitlines() if "==" in line]


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_installed_package_is_pinned_at_its_installed_version():
    pinned = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[normalized(name)] = version.strip()
    installed = {normalized(name): version for name, _, version in (line.partition("==") for line in frozen())}
    unpinned = sorted(n for n in installed if n not in pinned and not NOT_LOCKED.match(n))
    assert not unpinned, f"installed but not in requirements.lock (run `make lock`): {unpinned}"
    moved = {n: (pinned[n], installed[n]) for n in pinned if n in installed and installed[n] != pinned[n]}
    assert not moved, f"installed versions differ from the lock (lock, installed): {moved}"
