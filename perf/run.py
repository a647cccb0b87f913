"""Running perf_analyzer: the machine and server it measures, peak memory during a run, the client's write time."""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from wholebody.served_models import json_parameters
from wholebody.triton_server.perf_analyzer import perf_analyzer_env
from wholebody.triton_server.processes import process_group

log = logging.getLogger(__name__)


# --- the machine ---------------------------------------------------------------------------------
def cpu_model(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown CPU"
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def gpus() -> list[dict[str, str]]:
    """Name, driver and memory of each local GPU, from nvidia-smi ([] without one)."""
    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    found = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3:
            found.append({"name": parts[0], "driver": parts[1], "memory": parts[2]})
    return found


def slugify(text: str) -> str:
    text = re.sub(r"\((R|TM)\)|\bCPU\b|@.*$", " ", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpu": cpu_model(), "cores": os.cpu_count() or 0, "gpus": gpus()}
    if info["gpus"]:
        info["slug"] = f"{slugify(info['gpus'][0]['name'])}-x{len(info['gpus'])}"
    else:
        info["slug"] = f"{slugify(info['cpu'])}-{info['cores']}cores"
    return info


# --- the server ------------------------------------------------------------------------------------
def server_info(url: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Triton's version, the READY models, and per model its device, platform and TensorRT version."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if client.is_server_ready():
                break
        except Exception:  # noqa: BLE001 - connection refused while starting
            pass
        if time.monotonic() > deadline:
            raise ConnectionError(f"no ready Triton server at {url} (gRPC) after {timeout_s:.0f} s")
        time.sleep(0.5)
    meta = client.get_server_metadata(as_json=True)
    index = [{"name": name, "state": "READY"} for name in known_model_names() if client.is_model_ready(name)]
    models: dict[str, dict[str, str]] = {}
    for entry in index:
        if entry.get("state") != "READY" or entry["name"] in models:
            continue
        config = client.get_model_config(entry["name"], as_json=True)["config"]
        kinds = {g.get("kind", "KIND_GPU") for g in config.get("instance_group", [])}
        platform = config.get("platform") or config.get("backend", "")
        params = json_parameters(config)
        models[entry["name"]] = {
            "device": "GPU" if platform == "tensorrt_plan" or "KIND_GPU" in kinds else "CPU",
            "platform": platform,
            "tensorrt_version": params.get("tensorrt_version", ""),
            "placement": params.get("placement", ""),
        }
    client.close()
    return {"url": url, "triton_version": meta.get("version", "?"), "models": models}


def known_model_names() -> list[str]:
    """Every model the repository can hold: the repository index is an operator-only call (locked server)."""
    from wholebody import contract as c

    networks = [c.network_model_name(r, v) for r in c.RESOLUTIONS for v in c.VARIANTS]
    return [c.ENSEMBLE, c.PREPROCESS, c.SLIDING_WINDOW, c.POSTPROCESS, *networks]


# --- memory ----------------------------------------------------------------------------------------
def host_memory_bytes(pids: list[int]) -> int:
    """Resident memory of `pids` together, each page counted once.

    That is each process's private memory (RssAnon of /proc/PID/status) plus the resident size of
    every shared-memory file (/dev/shm: the Python backend's pools, clients' input regions) that any
    of them maps, counted once however many map it; shared library code is left out. Only counters
    are read: summing PSS instead walks every page table under the processes' memory lock, and
    sampling it every 0.1 s slowed the served pipeline by a third.
    """
    total, shared = 0, set()
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssAnon:")), 0)
        for line in maps.splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/dev/shm/"):
                shared.add(fields[5].removesuffix(" (deleted)"))
    for path in shared:
        try:
            total += os.stat(path).st_blocks * 512
        except OSError:
            continue  # removed since (a client unregistering its region)
    return total


def gpu_memory_from_metrics(text: str) -> int | None:
    """Sum of Triton's nv_gpu_memory_used_bytes gauges (None when the endpoint has none)."""
    values = [float(m.group(1)) for m in re.finditer(r"^nv_gpu_memory_used_bytes\{[^}]*\}\s+(\S+)", text, re.M)]
    return int(sum(values)) if values else None


def gpu_memory_from_nvidia_smi() -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return int(sum(float(v) for v in out.split()) * 2**20)
    except (subprocess.SubprocessError, OSError, ValueError):
        return None


def _group_of(pid: int) -> int:
    """The process group of `pid`; a LocalTritonServer leads its own, which outlives a crash."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return pid


@dataclass
class MemorySampler:
    """Samples, in a thread, the memory of the server's process group (host_memory_bytes) and the GPU
    memory in use.

    GPU memory comes from Triton's metrics endpoint (nv_gpu_memory_used_bytes), or nvidia-smi when the
    server exports no GPU metrics. Peaks are None when that source was not available.
    """

    server_pid: int | None = None
    metrics_url: str | None = None
    use_nvidia_smi: bool = False
    interval_s: float = 0.25
    peak_host: int | None = None
    peak_gpu: int | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        if self.server_pid is not None:
            host = host_memory_bytes(process_group(_group_of(self.server_pid)))
            if host:
                self.peak_host = max(self.peak_host or 0, host)
        gpu = None
        if self.metrics_url:
            try:
                with urllib.request.urlopen(self.metrics_url, timeout=2) as response:
                    gpu = gpu_memory_from_metrics(response.read().decode())
            except OSError:
                gpu = None
        if gpu is None and self.use_nvidia_smi:
            gpu = gpu_memory_from_nvidia_smi()
        if gpu is not None:
            self.peak_gpu = max(self.peak_gpu or 0, gpu)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self.peak_host = self.peak_gpu = None
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


# --- perf_analyzer ---------------------------------------------------------------------------------
def run_perf_analyzer(command: list[str], binary: Path, cwd: Path, log_path: Path) -> tuple[int, str]:
    """Run `command` (its argv[0] replaced by `binary`) in `cwd`; returns (exit code, its output).

    The output streams into `log_path` (tail -f it to follow a long run); perf_analyzer writes its report
    and its errors to stdout.
    """
    argv = [str(binary), *command[1:]]
    with open(log_path, "w") as out:
        out.write(f"$ (cd {cwd} && {shlex.join(command)})\n")
        out.flush()
        proc = subprocess.run(argv, cwd=cwd, env=perf_analyzer_env(binary), stdout=out, stderr=subprocess.STDOUT)
    return proc.returncode, log_path.read_text()


def clear_csvs(raw: Path, csv: str) -> None:
    """Remove a previous run's CSV and its composing models' `<model>_v<n>.<csv>`."""
    for path in [raw / csv, *raw.glob(f"*_v*.{csv}")]:
        path.unlink(missing_ok=True)


# --- the client's write of the label map --------------------------------------------------------------
def time_label_map_write(data_dir: Path, shape: tuple[int, int, int], repeats: int = 3) -> float:
    """Median seconds of writing a uint8 label map of `shape` as .nii.gz with the client's writer.

    perf_analyzer discards the outputs, so the labels are the input CT cut at -500 and 300 HU (air,
    soft tissue, bone): the size and the affine of what the server returns, with compressible content.
    """
    from client.segmentation_client import write_label_map
    from wholebody.contract import AFFINE, IMAGE

    ct = np.fromfile(data_dir / IMAGE, dtype="<f4").reshape(shape)
    labels = (ct > -500).astype(np.uint8) + (ct > 300).astype(np.uint8)
    del ct
    affine = np.fromfile(data_dir / AFFINE, dtype="<f8").reshape(4, 4)
    like = nib.Nifti1Image(np.zeros((1, 1, 1), dtype=np.int16), affine)
    times = []
    with tempfile.TemporaryDirectory(prefix="perf-write-") as tmp:
        for i in range(repeats):
            started = time.perf_counter()
            write_label_map(labels, like, Path(tmp) / f"seg{i}.nii.gz")
            times.append(time.perf_counter() - started)
    return float(np.median(times))
