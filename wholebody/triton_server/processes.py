"""The launcher's processes: a server's process group, its CPU time, and dying with the launcher (Linux /proc)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from pathlib import Path


def process_group(pgid: int) -> list[int]:
    """Every live process of process group `pgid` (a LocalTritonServer: the server and its stubs).

    Zombies (exited, not yet reaped: a killed stub until Triton reaps it) are left out.
    """
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid and _state(int(entry.name)) != "Z":
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError, OSError):
                continue
    return found


def _state(pid: int) -> str:
    """The one-letter state of /proc/PID/stat (R, S, D, Z, ...)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of `pids` together (/proc/PID/stat), in seconds."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: no dlopen in a forked child
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launcher dies (even by SIGKILL)."""
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def stop_process_group(process: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group led by `process` (started with start_new_session=True), SIGKILL it after
    `grace_s` seconds, and reap `process`. Nothing to do when it has exited already."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
