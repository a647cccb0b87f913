"""The Python backend stubs of a server, read from /proc: their models and shared-memory pools."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stub:
    """A Python backend stub process: its model and its shared-memory pool (/dev/shm)."""

    pid: int
    model: str
    region: Path


def stubs_of(pids: list[int]) -> list[Stub]:
    """The Python backend stubs among `pids`, from their command lines
    (`triton_python_backend_stub <repo>/<model>/<version>/model.py <shm region> ...`)."""
    found = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 2 and argv[0].endswith(b"triton_python_backend_stub"):
            model = Path(argv[1].decode()).parent.parent.name
            found.append(Stub(pid, model, Path("/dev/shm") / argv[2].decode().lstrip("/")))
    return found


def stub_models(pids: list[int]) -> dict[int, str]:
    """{pid: model name} of the Python backend stubs among `pids`."""
    return {stub.pid: stub.model for stub in stubs_of(pids)}


def resident_bytes(path: Path) -> int:
    """Resident size of a /dev/shm file (0 when gone)."""
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0
