"""The MONAI Label server's own virtualenv: made from slicer/requirements-monailabel.txt, cached in
`<cache>/monailabel/venv` (the cache of wholebody.triton_server: $WHOLEBODY_CACHE, else the repository's
.cache/), and remade when the requirements file changes (its SHA-256 is kept in `venv/.complete`).

    python -m slicer.venv            # make it (`make monailabel`); prints the interpreter's path

Why a virtualenv of its own: monailabel 0.8.5 imports pydicom-seg at start-up, which needs pydicom < 3 and
numpy < 2; the project's clinical/ code needs pydicom 3 (see docs/slicer.md). The project's client library is
not installed there: the launcher (slicer/serve.py) puts the repository on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = Path(__file__).resolve().parent / "requirements-monailabel.txt"
INSTALL_TIMEOUT_S = 1800  # pip resolves and installs ~150 packages (2.4 GiB, about 5 min here)


class VenvMissing(RuntimeError):
    """The virtualenv cannot be made here; the message is one line naming what is missing."""


def default_cache() -> Path:
    """$WHOLEBODY_CACHE, else the repository's .cache/ (the same rule as wholebody.triton_server)."""
    return Path(os.environ.get("WHOLEBODY_CACHE", REPO / ".cache"))


def venv_dir(cache: Path | None = None) -> Path:
    return (cache or default_cache()) / "monailabel" / "venv"


def requirements_digest() -> str:
    return hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()


def ready_python(cache: Path | None = None) -> Path | None:
    """The virtualenv's interpreter when it is complete and made from today's requirements, else None."""
    env = venv_dir(cache)
    marker = env / ".complete"
    if marker.exists() and marker.read_text().strip() == requirements_digest():
        return env / "bin" / "python"
    return None


def monailabel_python(cache: Path | None = None) -> Path:
    """The interpreter of the virtualenv, made (with this interpreter's venv module and pip) when missing or
    made from other requirements. Raises VenvMissing with pip's last line when it cannot be made (offline)."""
    python = ready_python(cache)
    if python is not None:
        return python
    env = venv_dir(cache)
    shutil.rmtree(env, ignore_errors=True)
    env.parent.mkdir(parents=True, exist_ok=True)
    log.info("making MONAI Label's virtualenv %s from %s (about 5 min, 2.4 GiB)", env, REQUIREMENTS.name)
    python = env / "bin" / "python"
    for command in ([sys.executable, "-m", "venv", str(env)],
                    [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                     "-r", str(REQUIREMENTS)]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False)
        if done.returncode != 0:
            shutil.rmtree(env, ignore_errors=True)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise VenvMissing(f"MONAI Label's virtualenv could not be made ({last}); it needs Python's venv module "
                              f"and PyPI: pip install -r {REQUIREMENTS.relative_to(REPO)}")
    (env / ".complete").write_text(requirements_digest() + "\n")
    return python


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slicer.venv", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default: $WHOLEBODY_CACHE or .cache)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        python = monailabel_python(args.cache)
    except (VenvMissing, subprocess.TimeoutExpired) as exc:
        log.error("error: %s", exc)
        return 1
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
