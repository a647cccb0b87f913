"""Names of a client's system shared-memory regions that say which process owns them.

A client that dies mid-request (Ctrl-C, SIGTERM, SIGKILL, the OOM killer) cannot unregister its
regions, and Triton keeps them registered and mapped until it restarts: 225 MiB for one 512x512x300
int16 CT. So each region's name carries its owner, and the launcher's watchdog (on the server's host)
reclaims the regions of owners that are gone:

    wholebody_client_<pid>_<start ticks>_<pid namespace>_<serial>_<in|out>

- pid: the client process;
- start ticks: field 22 of /proc/<pid>/stat (clock ticks after boot), so that a new process that got
  the same pid is not taken for the owner;
- pid namespace: the inode of /proc/self/ns/pid, so that a client in another container (another pid
  namespace) is never judged by this host's pid table: its regions are never reclaimed;
- serial: the region pair's number within the process.

At most 17 + 10 + 20 + 20 + 20 + 4 characters (under 100): a valid Triton region name and POSIX
shared-memory name (no '/', under 255). Standard library only: the client imports this without
torch, and so does the launcher.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

PREFIX = "wholebody_client"
ROLES = ("in", "out")
_NAME = re.compile(rf"{PREFIX}_(\d{{1,10}})_(\d{{1,20}})_(\d{{1,20}})_(\d{{1,20}})_({'|'.join(ROLES)})")
UNKNOWN = 0  # start ticks or namespace that could not be read: such an owner is never judged


@dataclass(frozen=True)
class Owner:
    """The process that created a region.

    pid: its process id (in its own pid namespace).
    start_ticks: when it started, clock ticks after boot (field 22 of /proc/<pid>/stat); 0 = unknown.
    namespace: the inode of its pid namespace (/proc/<pid>/ns/pid); 0 = unknown.
    """

    pid: int
    start_ticks: int
    namespace: int


@dataclass(frozen=True)
class ClientRegion:
    """A parsed client region name: its owner, its serial number in that process, and "in" or "out"."""

    owner: Owner
    serial: int
    role: str

    @property
    def name(self) -> str:
        return region_name(self.owner, self.serial, self.role)


def start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (start time, clock ticks after boot); None when there is no such
    process, or /proc is not readable (then its owner cannot be judged)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    # field 2 (comm) is in parentheses and may hold spaces or ')': split after the last ')', where
    # field 3 (state) is index 0, so field 22 is index 19
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[19]) if len(fields) > 19 and fields[19].isdigit() else None


def _state(pid: int) -> str | None:
    """The one-letter state of /proc/<pid>/stat (R, S, Z, ...), None when unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(errors="replace").rsplit(")", 1)[-1].split()
    except OSError:
        return None
    return fields[0] if fields else None


def pid_namespace(pid: int | str = "self") -> int:
    """The inode of /proc/<pid>/ns/pid: the same number for every process of one pid namespace;
    UNKNOWN (0) when it cannot be read (no /proc, or another user's process)."""
    try:
        return os.stat(f"/proc/{pid}/ns/pid").st_ino
    except OSError as exc:
        log.debug("cannot read the pid namespace of %s: %s", pid, exc)
        return UNKNOWN


def this_process() -> Owner:
    """This process as the owner of the regions it creates (computed per call: a fork has another pid).

    When /proc cannot tell its start time or namespace, both are UNKNOWN: its regions are never
    reclaimed by the watchdog, only unregistered by the client itself or a server restart.
    """
    pid = os.getpid()
    ticks = start_ticks(pid)
    namespace = pid_namespace()
    if ticks is None or namespace == UNKNOWN:
        return Owner(pid, UNKNOWN, UNKNOWN)
    return Owner(pid, ticks, namespace)


def region_name(owner: Owner, serial: int, role: str) -> str:
    """The region (and /dev/shm file) name of one of `owner`'s regions.

    Raises ValueError for a role other than "in"/"out" or a negative number.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if min(owner.pid, owner.start_ticks, owner.namespace, serial) < 0:
        raise ValueError(f"negative number in {owner} / serial {serial}")
    return f"{PREFIX}_{owner.pid}_{owner.start_ticks}_{owner.namespace}_{serial}_{role}"


def parse_region_name(name: str) -> ClientRegion | None:
    """The ClientRegion a name was built from by `region_name`; None for any other name (regions of
    other clients, the old `wholebody_client_<pid>_<n>_in` names, non-canonical spellings)."""
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    pid, ticks, namespace, serial = (int(g) for g in match.groups()[:4])
    region = ClientRegion(Owner(pid, ticks, namespace), serial, match.group(5))
    return region if region.name == name else None  # leading zeros etc.: not ours


def owner_is_gone(owner: Owner, namespace: int | None = None) -> bool:
    """Whether `owner` has certainly exited, judged in pid namespace `namespace` (default: this
    process's).

    True only when the owner lived in that namespace (and both its start time and namespace are known)
    and its pid is now free, a zombie, or another process (different start time). An owner of another
    namespace, or one that /proc cannot judge (another user's process hidden by `hidepid`), counts as
    alive: its regions are never reclaimed.
    """
    here = pid_namespace() if namespace is None else namespace
    if owner.namespace == UNKNOWN or owner.start_ticks == UNKNOWN or owner.namespace != here or owner.pid <= 0:
        return False
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # someone else's process: it exists; /proc may still tell its start time
    ticks = start_ticks(owner.pid)
    if ticks is None:
        return False  # it exists, but /proc hides it: cannot tell, so alive
    if ticks != owner.start_ticks:
        return True  # the pid was reused
    return _state(owner.pid) in ("Z", "X")  # exited, not yet reaped: its mappings are gone
