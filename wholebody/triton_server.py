"""A local Triton Inference Server for the embedded CPU default, the tests and the benchmarks.

The server binary comes from the `nvidia-pytriton` wheel on PyPI (Triton 2.51.0 with the Python
backend), unpacked into a cache folder; `perf_analyzer` comes from the `tritonclient==2.51.0` wheel
of the same release. Nothing is pip-installed into the project's environment: the wheels pin
packages this project does not want (see the README).

    python -m wholebody.triton_server install       # fetch the binaries into the cache
    python -m wholebody.triton_server serve          # serve model_repository/ on CPU until Ctrl-C

Every server the project starts is locked the same way (`tritonserver_args`): bound to loopback unless
told otherwise, explicit model control (only the models of one config are loaded, and the watchdog can
reload one), with loading, unloading and uploading models, tracing and log settings keyed behind an
operator key sent as a header (`operator_headers`); shared memory is keyed too when the server listens
beyond loopback. The launcher owns its processes: SIGTERM or SIGINT drains the server (`LocalTritonServer.drain`:
not ready, no new scans, those in flight finish within `--drain-seconds`), then stops it and every Python
backend stub (TERM, then KILL after a grace period) and removes the stubs' /dev/shm regions.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from wholebody.client_regions import PREFIX, owner_is_gone, parse_region_name, pid_namespace
from wholebody.contract import MODEL_REPOSITORY, REPO_ROOT
from wholebody.served_models import models_to_load

log = logging.getLogger(__name__)

PYTRITON_WHEEL = "nvidia-pytriton==0.7.0"  # carries tritonserver 2.51.0
PERF_ANALYZER_WHEEL = "tritonclient==2.51.0"  # the perf_analyzer of the same release
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


def _pip_download(spec: str, dest: Path, *extra: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), *extra, spec]
    subprocess.run(cmd, check=True)
    name = spec.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-{spec.split('==')[1]}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {spec} left no wheel in {dest}")
    return wheels[0]


def install_tritonserver(cache: Path = DEFAULT_CACHE) -> TritonInstall:
    """Unpack tritonserver and the Python backend (with this Python's stub) into `cache`."""
    install = TritonInstall(cache / "tritonserver-2.51.0")
    stub = install.backends / "python" / "triton_python_backend_stub"
    if stub.exists() and install.tritonserver.exists():
        return install
    log.info("fetching %s (55 MB) into %s", PYTRITON_WHEEL, cache)
    wheel = _pip_download(PYTRITON_WHEEL, cache / "wheels")
    staging = Path(tempfile.mkdtemp(dir=cache, prefix=".unpack-"))
    try:
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
                path.chmod(0o755)
        if install.root.exists():
            shutil.rmtree(install.root)
        staging.rename(install.root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return install


def install_perf_analyzer(cache: Path = DEFAULT_CACHE) -> Path:
    """Unpack perf_analyzer 2.51.0 next to links to the two libraries it needs; returns the binary."""
    triton = install_tritonserver(cache)
    root = cache / "perf_analyzer-2.51.0"
    binary = root / "bin" / "perf_analyzer"
    if not binary.exists():
        log.info("fetching perf_analyzer from %s into %s", PERF_ANALYZER_WHEEL, cache)
        wheel = _pip_download(
            PERF_ANALYZER_WHEEL, cache / "wheels", "--only-binary=:all:", "--platform", "manylinux1_x86_64"
        )
        (root / "bin").mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf:
            partial = binary.with_suffix(".partial")
            partial.write_bytes(zf.read("tritonclient-2.51.0.data/data/bin/perf_analyzer"))
            partial.chmod(0o755)
            partial.rename(binary)
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


def _free_port(address: str = "127.0.0.1") -> int:
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


def models_with_config(model_repository: Path, config_name: str | None) -> list[str]:
    """Models that have `configs/<config_name>.pbtxt`, plus the ensembles (they run anywhere).

    On a CPU box this leaves out GPU-only models (the TensorRT plans) that would fail to load.
    `config_name=None`: every model that has a config.pbtxt.
    """
    names = []
    for model_dir in sorted(p for p in Path(model_repository).iterdir() if p.is_dir()):
        config = model_dir / "config.pbtxt"
        if config_name is None:
            if config.exists():
                names.append(model_dir.name)
        elif (model_dir / "configs" / f"{config_name}.pbtxt").exists():
            names.append(model_dir.name)
        elif config.exists() and 'platform: "ensemble"' in config.read_text():
            names.append(model_dir.name)
    return names


# --- the operator key: who may load, unload and upload models ------------------------------------
OPERATOR_KEY_HEADER = "operator-key"  # the HTTP header; gRPC metadata carries GRPC_HEADER_PREFIX + it
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"  # tritonserver 2.51 matches gRPC metadata with this prefix
OPERATOR_KEY_ENV = "WHOLEBODY_OPERATOR_KEY"
# Triton's protocol groups only an operator may use: model-repository (load, unload, upload = run code
# on the server, repository index), trace (settings include files written on the server), logging.
OPERATOR_PROTOCOLS = ("model-repository", "trace", "logging")
# On a non-loopback address also the shared-memory protocol: a remote client cannot share this host's
# memory anyway, and registering a region by name would let it map any region of the server's host.
REMOTE_OPERATOR_PROTOCOLS = OPERATOR_PROTOCOLS + ("shared-memory",)


def operator_headers(key: str, protocol: str = "grpc") -> dict[str, str]:
    """Headers that authorise an operator call (`load_model`, `unload_model`, ...) with tritonclient.

    >>> operator_headers("k")
    {'triton-grpc-protocol-operator-key': 'k'}
    >>> operator_headers("k", "http")
    {'operator-key': 'k'}
    """
    if protocol not in ("grpc", "http"):
        raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
    return {(GRPC_HEADER_PREFIX if protocol == "grpc" else "") + OPERATOR_KEY_HEADER: key}


def new_operator_key() -> str:
    return secrets.token_urlsafe(32)


def read_or_create_operator_key(path: Path) -> str:
    """The key in `path`; a new one written there (mode 0600, never overwriting) when it is missing.

    Raises ValueError when the file is empty or holds characters a header value cannot carry.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if not key or any(c.isspace() or c in ",=" for c in key):
            raise ValueError(f"{path}: an operator key must be one word without ',' or '='") from None
        if path.stat().st_mode & 0o077:
            log.warning("%s is readable by other users; chmod 600 it", path)
        return key
    key = new_operator_key()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    log.info("wrote a new operator key to %s (mode 0600)", path)
    return key


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


# tritonserver flags that would undo the locks or the launcher's ownership; refused as extra arguments
LOCKED_FLAGS = (
    "--model-repository", "--model-store", "--model-control-mode", "--load-model", "--repository-poll-secs",
    "--http-restricted-api", "--grpc-restricted-protocol", "--http-address", "--grpc-address",
    "--metrics-address", "--backend-directory", "--backend-config=python,shm-region-prefix-name",
)


def tritonserver_args(
    *,
    tritonserver: Path,
    backend_directory: Path,
    model_repository: Path,
    models: list[str],
    config_name: str | None,
    operator_key: str,
    address: str = "127.0.0.1",
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    shm_region_prefix: str = "wholebody_",
    verbose: bool = False,
    extra: list[str] | None = None,
) -> list[str]:
    """The tritonserver command line every server of the project runs: the one place of its locks.

    - binds `address` only (loopback by default; a container passes 0.0.0.0);
    - model control `explicit` with exactly `models` loaded at start: only the models of one config
      (a CPU box must not try the GPU configs) and the watchdog can reload a model whose stub died;
    - the model-repository, trace and logging protocols (and shared memory off loopback) need the
      header `operator-key: <operator_key>` on HTTP, `triton-grpc-protocol-operator-key` on gRPC;
      inference, health, metadata, model config and statistics stay open;
    - the Python backend's shared-memory regions are named `<shm_region_prefix>...` so the launcher
      can remove exactly its own after a crash;
    - `extra` flags (tuning: `--cuda-memory-pool-byte-size=...`) go last; one of LOCKED_FLAGS raises
      ValueError.
    """
    for arg in extra or []:
        if arg.startswith(LOCKED_FLAGS):
            raise ValueError(f"{arg.split('=')[0]} is set by the launcher and cannot be overridden")
    if not operator_key or any(c.isspace() or c in ",=:" for c in operator_key):
        raise ValueError("the operator key must be a non-empty word without ',', '=' or ':'")
    protocols = ",".join(OPERATOR_PROTOCOLS if is_loopback(address) else REMOTE_OPERATOR_PROTOCOLS)
    restriction = f"{protocols}:{OPERATOR_KEY_HEADER}={operator_key}"
    cmd = [
        str(tritonserver),
        f"--model-repository={model_repository}",
        f"--backend-directory={backend_directory}",
        "--disable-auto-complete-config",
        "--model-control-mode=explicit",
        *[f"--load-model={m}" for m in models],
        "--strict-readiness=true",
        "--exit-timeout-secs=10",
        "--allow-gpu-metrics=false",
        "--pinned-memory-pool-byte-size=0",
        f"--http-address={address}",
        f"--grpc-address={address}",
        f"--metrics-address={address}",
        f"--http-port={http_port}",
        f"--grpc-port={grpc_port}",
        f"--metrics-port={metrics_port}",
        f"--grpc-restricted-protocol={restriction}",
        f"--http-restricted-api={restriction}",
        f"--backend-config=python,shm-region-prefix-name={shm_region_prefix}",
        f"--log-verbose={1 if verbose else 0}",
    ]
    if config_name:
        cmd.append(f"--model-config-name={config_name}")
    return cmd + list(extra or [])


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: no dlopen in a forked child
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launcher dies (even by SIGKILL)."""
    _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


# --- the watchdog: a model whose stub died, or whose idle stub keeps a large pool, is reloaded ----------
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


# --- clients that died mid-request: their shared-memory regions are reclaimed ---------------------------
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


# A model whose load fails by design: loaded while draining, it turns strict readiness false.
DRAIN_SENTINEL = "wholebody_draining"
DEFAULT_DRAIN_S = 90.0  # `serve --drain-seconds`; the Kubernetes grace period is sized on it

RELOAD_PARAMETER = "wholebody_reload"  # a config override that changes nothing but makes Triton reload


@dataclass
class StubWatchdog:
    """Keeps every READY Python-backend model serving and lean, with the operator key.

    Triton 2.51 does not restart a dead stub (the OOM killer's SIGKILL): its model fails every later
    request while the server and the model still report ready. And a stub's shared-memory pool grows to
    the largest request it saw (inputs are copied into it, even those it then refuses) and never
    shrinks. Every `interval_s` this compares the live stubs of each READY model with what its config
    asks for: a model that lost one is reloaded at once. When the whole server was idle over an
    interval (its processes used under 0.1 s of CPU: nothing in flight) and the stub of a model with
    variable-size tensors (the stages, not the network models, whose pools are bounded by their
    config) holds a pool above `max_idle_pool_bytes`, that model is reloaded too, to a fresh 1 MiB pool.

    A reload is Triton's own: `load_model` with the model's current config plus a changed parameter
    `wholebody_reload` (a load of an unchanged model does nothing); the old instance keeps serving until
    the new one is ready, and the ensemble is not touched. A reload that fails leaves the model
    unavailable, and then the server's readiness (strict) answers not ready.

    In a thread of its own, every `interval_s`, `regions` (ClientRegionReclaimer) unregisters the
    shared-memory regions of clients that exited and removes their /dev/shm files: within one interval
    (2 s) of the client's death, or of the end of the request still using them, also while a reload runs.
    """

    server: LocalTritonServer
    interval_s: float = 2.0
    max_idle_pool_bytes: int = 64 * 2**20
    reloads: list[tuple[str, str, float]] = field(default_factory=list)  # (model, why, seconds)
    regions: ClientRegionReclaimer = field(default_factory=ClientRegionReclaimer)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _regions_thread: threading.Thread | None = None

    def start(self) -> StubWatchdog:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="stub-watchdog", daemon=True)
        self._thread.start()
        # its own thread: a model reload (7-10 s on 2 cores) must not hold up reclaiming
        self._regions_thread = threading.Thread(target=self._reclaim_loop, name="client-regions", daemon=True)
        self._regions_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._regions_thread):
            if thread is not None:
                thread.join(timeout=120)

    def _reclaim_loop(self) -> None:
        """Every interval: `regions.reclaim` (a dead client's shared-memory regions), with the operator key."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        headers = operator_headers(self.server.operator_key)
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.regions.reclaim(client, headers)
                except InferenceServerException as exc:
                    if not self._stop.is_set():
                        log.warning("watchdog: client shared-memory regions: %s", exc.message())
        finally:
            client.close()

    @staticmethod
    def configured_stubs(config: dict[str, Any], gpus: int | None = None) -> int:
        """Python backend stubs a model config (JSON) asks for: `count` per group, times the GPUs of a
        KIND_GPU group (its `gpus` list, else every GPU: `gpus`, default the /dev/nvidiaN devices)."""
        if config.get("backend") != "python":
            return 0
        if gpus is None:
            gpus = len([d for d in Path("/dev").glob("nvidia[0-9]*")])
        total = 0
        for group in config.get("instance_group", []):
            count = int(group.get("count", 1))
            if group.get("kind", "KIND_GPU") == "KIND_GPU":
                count *= len(group.get("gpus", [])) or max(gpus, 1)
            total += count
        return total

    @staticmethod
    def variable_size(config: dict[str, Any]) -> bool:
        """Whether a model config (JSON) has a tensor of variable size (a -1 dim): its stub's pool grows
        with the requests. A network model's windows and logits have fixed dims: its pool stays at
        max_batch_size windows of logits, the working set of every request, and is left alone."""
        tensors = config.get("input", []) + config.get("output", [])
        return any(int(d) < 0 for t in tensors for d in t.get("dims", []))

    def _loop(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        headers = operator_headers(self.server.operator_key)
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        expected: dict[str, int] = {}
        variable: set[str] = set()
        last_cpu = -1.0
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    index = client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
                    ready = {m["name"] for m in index if m.get("state") == "READY"}
                    for model in ready - set(expected):
                        config = client.get_model_config(model, as_json=True)["config"]
                        expected[model] = self.configured_stubs(config)
                        if self.variable_size(config):
                            variable.add(model)
                    pids = self.server.pids()
                    stubs = stubs_of(pids)
                    counts = {m: sum(1 for s in stubs if s.model == m) for m in ready}
                    expected = {m: n for m, n in expected.items() if m in ready}
                    for model in sorted(m for m in ready if counts[m] < expected[m]):
                        self._reload(client, headers, model, "a Python backend stub died")
                        expected.pop(model, None)
                    cpu, last_cpu = last_cpu, cpu_seconds(pids)
                    if 0 <= last_cpu - cpu < 0.1:
                        large = {s.model for s in stubs if resident_bytes(s.region) > self.max_idle_pool_bytes}
                        for model in sorted(large & ready & variable):
                            self._reload(client, headers, model, "its idle stub holds a large shared-memory pool")
                            last_cpu = -1.0
                except InferenceServerException as exc:
                    if not self._stop.is_set():
                        log.warning("watchdog: %s", exc.message())
        finally:
            client.close()

    def _reload(self, client: Any, headers: dict[str, str], model: str, why: str) -> None:
        from tritonclient.utils import InferenceServerException

        if self._stop.is_set():
            return
        log.warning("watchdog: reloading %s: %s", model, why)
        started = time.monotonic()
        try:
            config = client.get_model_config(model, as_json=True)["config"]
            parameters = config.setdefault("parameters", {})
            generation = int(parameters.get(RELOAD_PARAMETER, {}).get("string_value") or 0) + 1
            parameters[RELOAD_PARAMETER] = {"string_value": str(generation)}
            client.load_model(model, config=json.dumps(config), headers=headers)
        except InferenceServerException as exc:
            log.error("watchdog: reloading %s failed (%s); the server now reports not ready", model, exc.message())
            return
        took = time.monotonic() - started
        self.reloads.append((model, why, took))
        log.warning("watchdog: %s reloaded in %.1f s", model, took)


@dataclass
class LocalTritonServer:
    """A tritonserver process in its own process group, locked as `tritonserver_args` says.

    Use as a context manager; `grpc_url` is what clients connect to. `config_name="cpu"` loads each
    model's `configs/cpu.pbtxt` where it has one (CPU instances) and `config.pbtxt` otherwise
    (None: every model's config.pbtxt, the GPU configs). `models=None` loads every model that has
    that config; a list loads only those models. Ports 0 are replaced by free ports. `operator_key`
    None: a fresh random key (`operator_key` holds it once started). `log_path` "-" writes the server
    log to this process's stdout; None: a new file under the cache's logs/. `watchdog`: reload a model
    whose stub died, or whose idle stub's pool exceeds `max_idle_pool_bytes` (StubWatchdog).

    Raises PortInUseError when a port is taken, RuntimeError/TimeoutError when the server does not
    come up (with the log's tail).
    """

    model_repository: Path = MODEL_REPOSITORY
    config_name: str | None = "cpu"
    models: list[str] | None = None
    address: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    log_path: Path | str | None = None
    verbose: bool = False
    startup_timeout_s: float = 180.0
    stop_grace_s: float = 20.0
    cache: Path = DEFAULT_CACHE
    tritonserver: Path | None = None
    backend_directory: Path | None = None
    operator_key: str = ""
    watchdog: bool = False
    max_idle_pool_bytes: int = 64 * 2**20
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    shm_region_prefix: str = ""
    _watchdog: StubWatchdog | None = None

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.address in ("0.0.0.0", "") else self.address

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        if self.tritonserver is not None and self.backend_directory is None:
            # <prefix>/bin/tritonserver next to <prefix>/backends, as in NVIDIA's container
            self.backend_directory = Path(self.tritonserver).parent.parent / "backends"
        if self.tritonserver is None or self.backend_directory is None:
            install = install_tritonserver(self.cache)
            self.tritonserver = self.tritonserver or install.tritonserver
            self.backend_directory = self.backend_directory or install.backends
        models = self.models if self.models is not None else models_with_config(self.model_repository, self.config_name)
        return tritonserver_args(
            tritonserver=self.tritonserver,
            backend_directory=self.backend_directory,
            model_repository=self.model_repository,
            models=models,
            config_name=self.config_name,
            operator_key=self.operator_key,
            address=self.address,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            metrics_port=self.metrics_port,
            shm_region_prefix=self.shm_region_prefix,
            verbose=self.verbose,
            extra=self.extra_args,
        )

    def environment(self) -> dict[str, str]:
        """The stub embeds libpython and runs the interpreter first on PATH: make it this one."""
        env = dict(os.environ)
        env.pop(OPERATOR_KEY_ENV, None)  # the key is on the command line's restriction, not in stubs
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
        return env

    def start(self) -> LocalTritonServer:
        for role in ("grpc", "http", "metrics"):
            attr = f"{role}_port"
            if getattr(self, attr):
                check_port_free(self.address, getattr(self, attr), role)
            else:
                setattr(self, attr, _free_port(self.address))
        self.operator_key = self.operator_key or new_operator_key()
        self.shm_region_prefix = f"wholebody_{os.getpid()}_{secrets.token_hex(4)}_"
        cmd = self.command()
        if self.log_path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            self.log_path = self.cache / "logs" / f"tritonserver-{self.grpc_port}-{stamp}-{os.getpid()}.log"
        if str(self.log_path) == "-":
            log_file = None
        else:
            self.log_path = Path(self.log_path)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(self.log_path, "ab")  # append: never truncate a log that is not ours
        log.info("starting tritonserver on %s (log: %s)", self.grpc_url, self.log_path)
        try:
            self.process = subprocess.Popen(
                cmd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        finally:
            if log_file is not None:
                log_file.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        if self.watchdog:
            self.start_watchdog()
        return self

    def start_watchdog(self, interval_s: float = 2.0) -> StubWatchdog:
        """Start a StubWatchdog on this server (`watchdog=True` does at start)."""
        self._watchdog = StubWatchdog(self, interval_s=interval_s, max_idle_pool_bytes=self.max_idle_pool_bytes).start()
        return self._watchdog

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        if not owns_listening_port(self.process.pid, self.http_port):
                            raise PortInUseError(f"http port {self.http_port} is answered by another process")
                        return
            except PortInUseError:
                raise
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or str(self.log_path) == "-" or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the watchdog, SIGTERM the server's process group, SIGKILL what is left after
        `stop_grace_s`, then remove the Python backend's /dev/shm regions of this server.

        The whole group, also when the server itself has already died: its Python backend stubs
        outlive a crashed server, and a killed stub leaves its region behind.
        """
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self.process is None:
            return
        pgid = self.process.pid
        if self.process.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.process.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s; killing its process group", self.stop_grace_s)
            except ProcessLookupError:
                pass
        elif self.process.returncode:
            log.warning("tritonserver had exited with code %s; see %s", self.process.returncode, self.log_path)
        deadline = time.monotonic() + self.stop_grace_s
        while process_group(pgid) and time.monotonic() < deadline:  # stubs finishing after the server
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        while process_group(pgid) and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        self.remove_shared_memory()

    def drain(self, timeout_s: float) -> bool:
        """Turn the server not ready and let the scans in flight finish, for at most `timeout_s`.

        Triton's own SIGTERM path cannot drain an ensemble: it stops every model's scheduler, and the
        next step of a scan in flight (preprocess -> sliding_window -> postprocess) is then refused
        ("Server is stopping, scheduler for model has stopped accepting new inference requests").
        So, with the operator key, before any signal:

        - a model that cannot load (`DRAIN_SENTINEL`, an unknown backend) is loaded: with strict
          readiness a model that failed to load makes `/v2/health/ready` answer 503 (Kubernetes takes
          the pod out of its endpoints); an unloaded model would not;
        - every READY ensemble is unloaded: new scans are refused (NOT_FOUND), while a scan in flight
          holds its ensemble and runs to its end through the stages, which stay loaded;
        - the ensembles' states are polled until none is UNLOADING (the last scan has answered).

        The watchdog stops once readiness is false. Direct requests to a stage are not tracked: Triton's
        --exit-timeout-secs covers them.
        Returns whether everything in flight finished within `timeout_s`.
        """
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        if self.process is None or self.process.poll() is not None:
            return True
        deadline = time.monotonic() + timeout_s
        headers = operator_headers(self.operator_key)
        with grpcclient.InferenceServerClient(self.grpc_url) as client:
            try:
                client.load_model(DRAIN_SENTINEL, config=json.dumps({"backend": DRAIN_SENTINEL}), headers=headers,
                                  files={"file:1/draining": b""})
            except InferenceServerException as exc:  # fails by design: the failure turns readiness false
                log.debug("drain: %s failed to load, as intended: %s", DRAIN_SENTINEL, exc.message())
            if client.is_server_ready():
                log.warning("drain: the server still reports ready (not started with strict readiness?)")
            if self._watchdog is not None:  # its reloads must not race the unloads
                self._watchdog.stop()
                self._watchdog = None
            ensembles = []
            for model in client.get_model_repository_index(headers=headers, as_json=True).get("models", []):
                if model.get("state") != "READY":
                    continue
                if client.get_model_config(model["name"], as_json=True)["config"].get("platform") == "ensemble":
                    ensembles.append(model["name"])
            for name in ensembles:
                client.unload_model(name, headers=headers)
            log.info("drain: not ready; %s take no new requests; waiting up to %.0f s for those in flight",
                     ", ".join(ensembles) or "no ensemble", timeout_s)
            while True:
                index = client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
                busy = [m["name"] for m in index if m["name"] in ensembles and m.get("state") == "UNLOADING"]
                if not busy:
                    log.info("drain: nothing in flight after %.1f s", timeout_s - (deadline - time.monotonic()))
                    return True
                if time.monotonic() >= deadline:
                    log.warning("drain: %s still busy after %.0f s; stopping anyway", ", ".join(busy), timeout_s)
                    return False
                time.sleep(0.25)

    def wait_lean(self, timeout_s: float = 120) -> bool:
        """Wait until no stage's stub holds a pool above `max_idle_pool_bytes` (the watchdog reloads
        those when the server is idle) and the stubs replaced by reloads have exited (one instance per
        model assumed). Returns False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            stubs = stubs_of(self.pids())
            stages = [s for s in stubs if not s.model.startswith("segresnet_")]
            if all(resident_bytes(s.region) <= self.max_idle_pool_bytes for s in stages) and len(stubs) == len(
                {s.model for s in stubs}
            ):
                return True
            time.sleep(0.5)
        return False

    def shared_memory_files(self) -> list[Path]:
        """The /dev/shm regions of this server's Python backend stubs."""
        if not self.shm_region_prefix:
            return []
        return sorted(Path("/dev/shm").glob(f"{self.shm_region_prefix}*"))

    def remove_shared_memory(self) -> None:
        for path in self.shared_memory_files():
            path.unlink(missing_ok=True)

    def pids(self) -> list[int]:
        """The server and every process of its group (the Python backend stubs)."""
        return [] if self.process is None else process_group(self.process.pid)

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _operator_key(key_file: Path | None) -> tuple[str, Path | None]:
    """The operator key (env WHOLEBODY_OPERATOR_KEY, else `key_file`) and a file to remove at exit.

    Neither given: a new key in a fresh private folder (0700; the file 0600), removed when the
    server stops: an operator on this host reads it from the path the launcher logs.
    """
    if os.environ.get(OPERATOR_KEY_ENV):
        return os.environ[OPERATOR_KEY_ENV].strip(), None
    if key_file is not None:
        return read_or_create_operator_key(key_file), None
    folder = Path(tempfile.mkdtemp(prefix="wholebody-operator-"))
    path = folder / "operator-key"
    return read_or_create_operator_key(path), path


class _Stop(Exception):
    """Raised in the main thread by SIGTERM/SIGINT."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def _drain(server: LocalTritonServer, seconds: float) -> None:
    """`server.drain(seconds)`; a server that cannot be drained (it died, or refuses) is stopped anyway."""
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()
    try:
        finished = server.drain(seconds)
    except InferenceServerException as exc:
        log.warning("drain: %s; stopping without it", exc.message())
        return
    log.info("drain: %s in %.1f s", "done" if finished else "timed out", time.monotonic() - started)


def serve(args: argparse.Namespace) -> int:
    # A background job starts with SIGINT ignored, and SIGTERM kills Python without cleanup: own both.
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        key, generated = _operator_key(args.operator_key_file)
    except (OSError, ValueError) as exc:
        log.error("error: operator key: %s", exc)
        return 2
    config_name = args.config_name or None
    # Without --model: every model of the config, less the torch network models when the sliding-window
    # stage runs the network in-process (the CPU default): they would only be idle stubs.
    models = args.models or models_to_load(
        args.model_repository, config_name, models_with_config(args.model_repository, config_name)
    )
    server = LocalTritonServer(
        model_repository=args.model_repository,
        config_name=config_name,
        models=models,
        address=args.address,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_path=args.log,
        tritonserver=args.tritonserver,
        backend_directory=args.backend_directory,
        operator_key=key,
        watchdog=not args.no_watchdog,
        max_idle_pool_bytes=args.max_idle_pool_mb * 2**20,
        verbose=args.verbose,
        extra_args=args.tritonserver_arg,
    )
    code = 0
    stopping = False
    try:
        server.start()
        where = f"key file {generated}" if generated else (args.operator_key_file or f"${OPERATOR_KEY_ENV}")
        log.info(
            "serving %s on grpc %s, http %s, metrics %s; operator key: %s; watchdog %s; SIGTERM or Ctrl-C stops",
            args.model_repository, server.grpc_url, server.http_url, server.metrics_url, where,
            "off" if args.no_watchdog else "on",
        )
        assert server.process is not None
        code = server.process.wait()
        log.error("tritonserver exited by itself with code %s", code)
        code = code or 1
    except _Stop as stop:
        log.info("%s: draining, then stopping tritonserver and its stubs", stop)
        stopping = True
    except (PortInUseError, RuntimeError, TimeoutError, ValueError) as exc:
        log.error("error: %s", exc)
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not interrupt the cleanup
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if stopping and args.drain_seconds > 0:
            _drain(server, args.drain_seconds)
        server.stop()
        if generated is not None:
            shutil.rmtree(generated.parent, ignore_errors=True)
    return code


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (subcommands install and serve); tests/test_docs.py parses the docs' commands with it."""
    parser = argparse.ArgumentParser(
        prog="python -m wholebody.triton_server",
        description="Fetch and run a local Triton server serving the model repository, locked down: "
        "clients may infer, read metadata/config/statistics and (on loopback) use shared memory; loading, "
        "unloading and uploading models need the operator key.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="fetch tritonserver and perf_analyzer into the cache folder")
    serve_parser = sub.add_parser(
        "serve",
        help="serve the model repository until SIGTERM or Ctrl-C",
        description="Serve the model repository until SIGTERM or Ctrl-C, then stop the server and every "
        "stub and remove their shared memory. An operator reloads a model with the key, e.g. "
        "tritonclient.grpc.InferenceServerClient(URL).load_model(NAME, "
        "headers={'triton-grpc-protocol-operator-key': KEY}) or "
        "curl -X POST -H 'operator-key: KEY' http://HOST:8000/v2/repository/models/NAME/load",
    )
    serve_parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    serve_parser.add_argument(
        "--config-name", default="cpu",
        help="per-model config to load from configs/NAME.pbtxt ('' = each model's config.pbtxt: the GPU configs)",
    )
    serve_parser.add_argument("--model", action="append", dest="models", help="load only this model (repeatable)")
    serve_parser.add_argument(
        "--address", default="127.0.0.1", help="address to listen on (default loopback; 0.0.0.0 in a container)"
    )
    serve_parser.add_argument("--grpc-port", type=int, default=8001, help="0 = any free port")
    serve_parser.add_argument("--http-port", type=int, default=8000, help="0 = any free port")
    serve_parser.add_argument("--metrics-port", type=int, default=8002, help="0 = any free port")
    serve_parser.add_argument("--log", default="-", help="server log file, appended to ('-' = stdout, the default)")
    serve_parser.add_argument(
        "--tritonserver", type=Path, help="server binary (default: the one unpacked from nvidia-pytriton into "
        "the cache; in NVIDIA's container /opt/tritonserver/bin/tritonserver)",
    )
    serve_parser.add_argument(
        "--backend-directory", type=Path, help="backends folder (default: next to --tritonserver's bin/, else the "
        "cached one; in NVIDIA's container /opt/tritonserver/backends)",
    )
    serve_parser.add_argument(
        "--operator-key-file", type=Path,
        help=f"file holding the operator key (created with a new key, mode 0600, when missing); ${OPERATOR_KEY_ENV} "
        "takes precedence; neither: a new key in a private temporary file whose path is logged",
    )
    serve_parser.add_argument(
        "--no-watchdog", action="store_true",
        help="do not reload a model whose Python stub died (the health command then fails: let the "
        "orchestrator restart the server)",
    )
    serve_parser.add_argument(
        "--max-idle-pool-mb", type=int, default=64,
        help="the watchdog reloads a model whose stub keeps a shared-memory pool above this while the server "
        "is idle (a pool grows to the largest request and never shrinks; default 64)",
    )
    serve_parser.add_argument(
        "--drain-seconds", type=float, default=DEFAULT_DRAIN_S,
        help="on SIGTERM or Ctrl-C: the server first reports not ready and takes no new scans, and the scans in "
        f"flight have this long to finish before tritonserver is stopped (default {DEFAULT_DRAIN_S:.0f}; 0 = stop "
        "at once); then tritonserver's own exit timeout (10 s) and the stubs' stop (up to 20 s) follow",
    )
    serve_parser.add_argument("--verbose", action="store_true", help="tritonserver --log-verbose=1")
    serve_parser.add_argument(
        "--tritonserver-arg", action="append", default=[], metavar="FLAG",
        help="an extra tritonserver flag, e.g. --tritonserver-arg=--cuda-memory-pool-byte-size=0:8589934592 "
        "(repeatable; flags of the locks are refused)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "install":
        install = install_tritonserver()
        binary = install_perf_analyzer()
        print(f"tritonserver:  {install.tritonserver}\nperf_analyzer: {binary}")
        return 0
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
