"""The locks of every server the project starts: the operator key and the tritonserver command line.

Bound to loopback unless told otherwise, explicit model control (only the models of one config are
loaded, and the watchdog can reload one), with loading, unloading and uploading models, tracing and log
settings keyed behind an operator key sent as a header (`operator_headers`); shared memory is keyed too
when the server listens beyond loopback.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# who may load, unload and upload models
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
    """A fresh random operator key: 32 bytes, URL-safe base64 (43 characters, a valid header value)."""
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
    """Whether `address` (an IP or "localhost") is a loopback address; a host name other than localhost is not."""
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


def resolve_operator_key(key_file: Path | None) -> tuple[str, Path | None]:
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
