"""The client installs and runs alone: `pip install .` (no extras) gives a client without torch or MONAI
that segments a CT through a real server, and importing or using it for NIfTI loads no torch, MONAI,
DICOM or format library (they are imported when a DICOM input or another output is used)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.__main__ import main as client_main
from wholebody.contract import REPO_ROOT
from wholebody.triton_server import LocalTritonServer

# top-level modules a NIfTI-only client must not load
HEAVY = ("torch", "monai", "pydicom", "highdicom", "PIL", "matplotlib", "nrrd", "dicomweb_client")
# what a wheel of the project is built from (pyproject's packages.find)
PACKAGES = ("wholebody", "client", "export", "perf", "clinical", "demo")
PIP_TIMEOUT_S = 600
# pip's messages when the package index cannot be reached (then the fresh-install test is skipped)
UNREACHABLE = re.compile(
    r"NewConnectionError|Max retries exceeded|Temporary failure in name resolution|Network is unreachable|"
    r"ConnectTimeout|Failed to establish a new connection"
)

PRINT_MODULES = "import json, sys; print(json.dumps(sorted(sys.modules)))"


def _env(pythonpath: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def heavy_modules(python: str | Path, code: str, cwd: Path, pythonpath: Path | None = REPO_ROOT) -> list[str]:
    """The HEAVY modules loaded after `python -c code` (whose last stdout line is PRINT_MODULES' output)."""
    done = subprocess.run(
        [str(python), "-c", code], cwd=cwd, env=_env(pythonpath), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    return sorted({name.split(".")[0] for name in loaded} & set(HEAVY))


def size_check_code(url: str, then: str = "") -> str:
    """Import the client, build a SegmentationClient, check headers against ServerLimits, run `then`
    (statements at the left margin), print sys.modules."""
    return textwrap.dedent(f"""
        import numpy as np
        import client
        from client import SegmentationClient
        from client.inputs import Header
        from client.segmentation_client import SegmentationError, ServerLimits

        SegmentationClient({url!r}).close()  # gRPC connects lazily: no server needed
        limits = ServerLimits(max_input_voxels=10**9, max_resampled_voxels=20_000_000, default_resolution="lowres")
        limits.check(Header((122, 101, 112), np.diag([3.0, 3.0, 3.0, 1.0])), "highres")
        try:
            limits.check(Header((512, 512, 800), np.diag([0.8, 0.8, 1.0, 1.0])), "highres")
        except SegmentationError as exc:
            assert "max_resampled_voxels" in str(exc), exc
        else:
            raise AssertionError("a 512x512x800 CT (40M voxels at 1.5 mm) passed a limit of 20M")
    """) + then + "\n" + PRINT_MODULES + "\n"


def test_import_and_size_check_load_no_torch_monai_or_dicom(tmp_path: Path) -> None:
    assert heavy_modules(sys.executable, size_check_code("localhost:1"), cwd=tmp_path) == []


def test_cli_help_loads_no_torch_monai_or_dicom(tmp_path: Path) -> None:
    # `python -m client --help` as -m runs it (runpy), then the modules it left loaded
    runner = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = ["client", "--help"]
        try:
            runpy.run_module("client", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            assert exc.code == 0, exc.code
        {PRINT_MODULES}
    """)
    assert heavy_modules(sys.executable, runner, cwd=tmp_path) == []
    done = subprocess.run([sys.executable, "-m", "client", "--help"], cwd=tmp_path, env=_env(REPO_ROOT),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage: python -m client" in done.stdout, done.stderr[-3000:]


def test_nifti_segmentation_loads_no_torch_monai_or_dicom(
    server: LocalTritonServer, example_ct: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ct_seg.nii.gz"
    segment = textwrap.dedent(f"""
        with SegmentationClient({server.grpc_url!r}) as seg:
            seg.limits().check(Header((10, 10, 10), np.eye(4)), "lowres")
            result = seg.segment_file({str(example_ct)!r}, {str(out)!r}, resolution="lowres")
            assert result.label_map.max() > 0
    """)
    assert heavy_modules(sys.executable, size_check_code(server.grpc_url, segment), cwd=tmp_path) == []
    assert out.exists()


def _pip_install(venv_python: Path, source: Path) -> None:
    """`pip install --quiet source` into the venv; skips the test when the package index is unreachable."""
    done = subprocess.run(
        [str(venv_python), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True, text=True, timeout=PIP_TIMEOUT_S, env=_env(None),
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr)[-4000:]
        if UNREACHABLE.search(output):
            pytest.skip(f"the package index is unreachable, so the client cannot be installed fresh:\n{output}")
        pytest.fail(f"pip install {source} (no extras) failed:\n{output}")


def test_client_installs_without_torch_and_segments(
    server: LocalTritonServer, example_ct: Path, tmp_path: Path
) -> None:
    """`pip install .` into a fresh virtualenv: no torch, and its `python -m client` gives the same labels
    as this environment's client."""
    source = tmp_path / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    source.mkdir()
    shutil.copy2(REPO_ROOT / "pyproject.toml", source / "pyproject.toml")
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        _check_fresh_client(venv, server, example_ct, tmp_path)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # a few hundred MB: not left to pytest's tmp rotation


def _check_fresh_client(venv: Path, server: LocalTritonServer, example_ct: Path, tmp_path: Path) -> None:
    python = venv / "bin" / "python"
    _pip_install(python, tmp_path / "source")
    run = tmp_path / "run"  # no `client/` here: `python -m client` must find the installed one
    run.mkdir()

    def venv_python(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(python), *args], cwd=run, env=_env(None), capture_output=True, text=True,
                              timeout=600)

    probe = venv_python("-c", "import client, importlib.util as u; print(client.__file__); "
                        "print(u.find_spec('torch') is None and u.find_spec('monai') is None)")
    assert probe.returncode == 0, probe.stderr[-3000:]
    where, no_torch = probe.stdout.split()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert no_torch == "True", "torch or MONAI came with `pip install .`"
    assert venv_python("-c", "import torch").returncode != 0

    helped = venv_python("-m", "client", "--help")
    assert helped.returncode == 0 and "usage: python -m client" in helped.stdout, helped.stderr[-3000:]
    assert heavy_modules(python, size_check_code("localhost:1"), cwd=run, pythonpath=None) == []

    fresh, ours = tmp_path / "fresh", tmp_path / "ours"
    done = venv_python("-m", "client", str(example_ct), "-o", str(fresh), "-u", server.grpc_url,
                       "--resolution", "lowres", "-q")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert client_main([str(example_ct), "-o", str(ours), "-u", server.grpc_url, "--resolution", "lowres", "-q"]) == 0
    (label_path,) = fresh.glob("*_seg.nii.gz")
    (reference_path,) = ours.glob("*_seg.nii.gz")
    labels = np.asarray(nib.load(label_path).dataobj)
    assert labels.shape == nib.load(example_ct).shape and labels.max() > 0
    np.testing.assert_array_equal(labels, np.asarray(nib.load(reference_path).dataobj))
    np.testing.assert_array_equal(nib.load(label_path).affine, nib.load(reference_path).affine)
