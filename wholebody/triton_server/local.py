"""A local tritonserver process in its own process group: started locked, watched, drained and stopped."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from wholebody.contract import MODEL_REPOSITORY
from wholebody.served_models import models_with_config
from wholebody.triton_server.install import DEFAULT_CACHE, install_tritonserver
from wholebody.triton_server.locks import OPERATOR_KEY_ENV, new_operator_key, operator_headers, tritonserver_args
from wholebody.triton_server.ports import PortInUseError, check_port_free, free_port, owns_listening_port
from wholebody.triton_server.processes import die_with_parent, process_group
from wholebody.triton_server.stubs import resident_bytes, stubs_of
from wholebody.triton_server.watchdog import StubWatchdog

log = logging.getLogger(__name__)

# A model whose load fails by design: loaded while draining, it turns strict readiness false.
DRAIN_SENTINEL = "wholebody_draining"
DEFAULT_DRAIN_S = 90.0  # `serve --drain-seconds`; the Kubernetes grace period is sized on it


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
                setattr(self, attr, free_port(self.address))
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
                preexec_fn=die_with_parent,
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

        - every READY ensemble is unloaded: new scans are refused (NOT_FOUND), while a scan in flight
          holds its ensemble and runs to its end through the stages, which stay loaded;
        - then a model that cannot load (`DRAIN_SENTINEL`, an unknown backend) is loaded: with strict
          readiness a model that failed to load makes `/v2/health/ready` answer 503 (Kubernetes takes
          the pod out of its endpoints); an unloaded model would not. In this order a server that
          answers not ready refuses every new scan (the other order left a window, measured on a busy
          2-core machine, in which a not-ready server still accepted one);
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
            try:
                client.load_model(DRAIN_SENTINEL, config=json.dumps({"backend": DRAIN_SENTINEL}), headers=headers,
                                  files={"file:1/draining": b""})
            except InferenceServerException as exc:  # fails by design: the failure turns readiness false
                log.debug("drain: %s failed to load, as intended: %s", DRAIN_SENTINEL, exc.message())
            if client.is_server_ready():
                log.warning("drain: the server still reports ready (not started with strict readiness?)")
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
