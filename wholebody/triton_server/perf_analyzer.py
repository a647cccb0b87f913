"""perf_analyzer 2.51.0 from the `tritonclient==2.51.0` wheel (the same release as the server), and the
environment in which it finds its libraries (those of the unpacked tritonserver)."""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

from wholebody.atomic import atomic_path
from wholebody.triton_server.install import DEFAULT_CACHE, install_tritonserver, make_executable, pip_download

log = logging.getLogger(__name__)

PERF_ANALYZER_WHEEL = "tritonclient==2.51.0"  # the perf_analyzer of the same release


def install_perf_analyzer(cache: Path = DEFAULT_CACHE) -> Path:
    """Unpack perf_analyzer 2.51.0 next to links to the two libraries it needs; returns the binary."""
    triton = install_tritonserver(cache)
    root = cache / "perf_analyzer-2.51.0"
    binary = root / "bin" / "perf_analyzer"
    if not binary.exists():
        log.info("fetching perf_analyzer from %s into %s", PERF_ANALYZER_WHEEL, cache)
        wheel = pip_download(
            PERF_ANALYZER_WHEEL, cache / "wheels", "--only-binary=:all:", "--platform", "manylinux1_x86_64"
        )
        (root / "bin").mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, atomic_path(binary) as temporary:
            temporary.write_bytes(zf.read("tritonclient-2.51.0.data/data/bin/perf_analyzer"))
            make_executable(temporary)
    (root / "lib").mkdir(parents=True, exist_ok=True)
    for pattern, soname in (("libcudart-*.so.12*", "libcudart.so.12"), ("libb64-*.so.0d", "libb64.so.0d")):
        link = root / "lib" / soname
        if link.exists():
            continue
        matches = sorted(triton.libs.glob(pattern))
        if not matches:
            raise RuntimeError(f"{triton.libs} has no {pattern} for perf_analyzer")
        link.unlink(missing_ok=True)  # a dangling link from an earlier unpack
        link.symlink_to(matches[0])
    return binary


def perf_analyzer_env(binary: Path) -> dict[str, str]:
    """Environment in which `binary` (from install_perf_analyzer) finds its libraries."""
    env = dict(os.environ)
    lib = str(binary.parent.parent / "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    return env
