"""A local Triton Inference Server for the embedded CPU default, the tests and the benchmarks.

The server binary comes from the `nvidia-pytriton` wheel on PyPI (Triton 2.51.0 with the Python
backend), unpacked into a cache folder; `perf_analyzer` comes from the `tritonclient==2.51.0` wheel
of the same release. Nothing is pip-installed into the project's environment: the wheels pin
packages this project does not want (see the README).

    python -m wholebody.triton_server install       # fetch the binaries into the cache
    python -m wholebody.triton_server serve          # serve model_repository/ on CPU until Ctrl-C
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from wholebody.contract import MODEL_REPOSITORY, REPO_ROOT

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
    """Every live process of process group `pgid` (a LocalTritonServer: the server and its stubs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def models_with_config(model_repository: Path, config_name: str) -> list[str]:
    """Models that have `configs/<config_name>.pbtxt`, plus the ensembles (they run anywhere).

    On a CPU box this leaves out GPU-only models (the TensorRT plans) that would fail to load.
    """
    names = []
    for model_dir in sorted(p for p in Path(model_repository).iterdir() if p.is_dir()):
        config = model_dir / "config.pbtxt"
        if (model_dir / "configs" / f"{config_name}.pbtxt").exists():
            names.append(model_dir.name)
        elif config.exists() and 'platform: "ensemble"' in config.read_text():
            names.append(model_dir.name)
    return names


@dataclass
class LocalTritonServer:
    """A tritonserver process on loopback, in its own process group.

    Use as a context manager; `grpc_url` is what clients connect to. `config_name="cpu"` loads each
    model's `configs/cpu.pbtxt` where it has one (CPU instances) and `config.pbtxt` otherwise.
    `models=None` loads every model that has that config (all of them when `config_name` is None);
    a list loads only those models.
    """

    model_repository: Path = MODEL_REPOSITORY
    config_name: str | None = "cpu"
    models: list[str] | None = None
    grpc_port: int = 0
    http_port: int = 0
    metrics_port: int = 0
    log_path: Path | None = None
    verbose: bool = False
    startup_timeout_s: float = 180.0
    cache: Path = DEFAULT_CACHE
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def command(self, install: TritonInstall) -> list[str]:
        cmd = [
            str(install.tritonserver),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={install.backends}",
            "--disable-auto-complete-config",
            "--exit-timeout-secs=10",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={1 if self.verbose else 0}",
        ]
        if self.config_name:
            cmd.append(f"--model-config-name={self.config_name}")
        models = self.models
        if models is None and self.config_name:
            models = models_with_config(self.model_repository, self.config_name)
        if models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={m}" for m in models]
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The stub embeds libpython and runs the interpreter first on PATH: make it this one."""
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
        return env

    def start(self) -> LocalTritonServer:
        install = install_tritonserver(self.cache)
        for attr in ("grpc_port", "http_port", "metrics_port"):
            if not getattr(self, attr):
                setattr(self, attr, _free_port())
        if self.log_path is None:
            self.log_path = self.cache / "logs" / f"tritonserver-{self.grpc_port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting tritonserver on %s (log: %s)", self.grpc_url, self.log_path)
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.command(install),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

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
                        return
            except OSError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"tritonserver not ready after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL what is left.

        The whole group, also when the server itself has already died: its Python backend stubs
        outlive a crashed server.
        """
        if self.process is None:
            return
        pgid = self.process.pid
        if self.process.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in 20 s; killing its process group")
            except ProcessLookupError:
                pass
        elif self.process.returncode:
            log.warning("tritonserver had exited with code %s; see %s", self.process.returncode, self.log_path)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def pids(self) -> list[int]:
        """The server and every process of its group (the Python backend stubs)."""
        return [] if self.process is None else process_group(self.process.pid)

    def __enter__(self) -> LocalTritonServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wholebody.triton_server",
        description="Fetch and run a local Triton server (CPU) serving the model repository.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install", help="fetch tritonserver and perf_analyzer into the cache folder")
    serve = sub.add_parser("serve", help="serve the model repository until interrupted")
    serve.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--metrics-port", type=int, default=8002)
    serve.add_argument(
        "--config-name", default="cpu", help="per-model config to load from configs/NAME.pbtxt ('' = config.pbtxt)"
    )
    serve.add_argument("--model", action="append", dest="models", help="load only this model (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "install":
        install = install_tritonserver()
        binary = install_perf_analyzer()
        print(f"tritonserver:  {install.tritonserver}\nperf_analyzer: {binary}")
        return 0
    server = LocalTritonServer(
        model_repository=args.model_repository,
        config_name=args.config_name or None,
        models=args.models,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
    )
    with server:
        log.info("serving %s on grpc %s, http %s; Ctrl-C stops", args.model_repository, server.grpc_url, server.http_url)
        try:
            assert server.process is not None
            server.process.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
