"""The server's ports: a free one, a taken one named before the start, and who holds a listening one."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port(address: str = "127.0.0.1") -> int:
    """A TCP port on `address` that was free a moment ago (the kernel's pick for port 0); OSError if none."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


class PortInUseError(RuntimeError):
    """A port the server should listen on is taken by another process."""


def check_port_free(address: str, port: int, role: str) -> None:
    """Raise PortInUseError naming `port` (and its role) when something already listens on it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as tritonserver: TIME_WAIT is no conflict
        try:
            s.bind((address, port))
        except OSError as exc:
            raise PortInUseError(
                f"{role} port {port} on {address} is in use by another process ({exc.strerror}); "
                f"stop that server or pick another port (--{role}-port, 0 = any free port)"
            ) from None


def listening_socket_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (any address), from /proc/net/tcp{,6}."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def owns_listening_port(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on `port` (so a ready answer there is its own)."""
    inodes = listening_socket_inodes(port)
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False
