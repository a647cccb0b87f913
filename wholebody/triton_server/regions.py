"""Client shared-memory regions whose owner has exited: unregistered from the server, files removed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wholebody.client_regions import PREFIX, owner_is_gone, parse_region_name, pid_namespace

log = logging.getLogger(__name__)


@dataclass
class ClientRegionReclaimer:
    """Unregisters the system shared-memory regions of client processes that have exited, and removes
    their /dev/shm files.

    A client that dies mid-request (Ctrl-C, SIGTERM, SIGKILL) cannot unregister its regions, and Triton
    keeps them registered and mapped until it restarts (225 MiB for one 512x512x300 int16 CT).
    `client.SegmentationClient` names its regions after its process (`wholebody.client_regions`:
    pid, start time, pid namespace). Each `reclaim` lists the server's regions; for each one whose
    name parses as a client region of this process's pid namespace (`namespace`) whose owner is gone
    (no such process, a zombie, or another process with its pid: `owner_is_gone`), it

    - removes its /dev/shm file if still there (only when the region's key is its own name, as the
      client registers it; the server keeps its own mapping, so this is safe even while in use);
    - unregisters it: Triton refuses while a request still uses it ("in use"), and the next call
      tries again.

    Files in /dev/shm named as client regions of dead owners that are not registered (the owner died
    between creating and registering them) are removed too. Regions and files of other names, of
    live owners, and of other pid namespaces are never touched. Called every 2 s by the watchdog, a
    dead client's regions are gone within 2 s of its death, or of the end of the request still using
    them. Raises InferenceServerException when the server cannot list its regions.
    """

    namespace: int = field(default_factory=pid_namespace)
    shm_dir: Path = Path("/dev/shm")
    reclaimed: list[tuple[str, int]] = field(default_factory=list)  # (region, bytes) unregistered
    _in_use: set[str] = field(default_factory=set)  # dead owners' regions a request still uses

    def reclaim(self, client: Any, headers: dict[str, str] | None = None) -> list[str]:
        """One pass with a `tritonclient.grpc.InferenceServerClient` (`headers`: the operator key's,
        needed when the shared-memory protocol is restricted). Returns the regions unregistered."""
        from tritonclient.utils import InferenceServerException

        status = client.get_system_shared_memory_status(headers=headers, as_json=True)
        registered = status.get("regions", {})
        done = []
        for name, region in sorted(registered.items()):
            parsed = parse_region_name(name)
            if parsed is None or not owner_is_gone(parsed.owner, self.namespace):
                continue
            if region.get("key") == f"/{name}":
                self._remove_file(name)
            try:
                client.unregister_system_shared_memory(name, headers=headers)
            except InferenceServerException as exc:
                message = exc.message() or ""
                if "in use" in message:
                    if name not in self._in_use:
                        log.info("watchdog: region %s of exited client pid %d is still in use by its request; "
                                 "reclaimed when that ends", name, parsed.owner.pid)
                    self._in_use.add(name)
                else:
                    log.warning("watchdog: could not unregister region %s of exited client pid %d: %s",
                                name, parsed.owner.pid, message)
                continue
            self._in_use.discard(name)
            size = int(region.get("byte_size", 0))
            self.reclaimed.append((name, size))
            done.append(name)
            log.warning("watchdog: reclaimed shared-memory region %s (%.1f MiB) of client pid %d, which exited",
                        name, size / 2**20, parsed.owner.pid)
        for path in sorted(self.shm_dir.glob(f"{PREFIX}_*")):
            parsed = parse_region_name(path.name)
            if path.name in registered or parsed is None or not owner_is_gone(parsed.owner, self.namespace):
                continue
            if self._remove_file(path.name):
                log.warning("watchdog: removed %s, never registered, of client pid %d, which exited",
                            path, parsed.owner.pid)
        self._in_use &= set(registered)
        return done

    def _remove_file(self, name: str) -> bool:
        """Remove shm_dir/name; False when it was not there or could not be removed (logged)."""
        try:
            (self.shm_dir / name).unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("watchdog: cannot remove %s: %s", self.shm_dir / name, exc)
            return False
        return True
