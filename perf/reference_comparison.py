"""Served pipeline vs the bundle's own MONAI pipeline, side by side in one run: time, memory, labels.

    python -m perf.reference_comparison                       # lowres, example_ct + 512x512x397 CT
    python -m perf.reference_comparison --bundle /path/to/wholeBody_ct_segmentation --cases example_ct

For each CT it starts a local Triton server (CPU configs) on a temporary copy of the model repository
with the bundle installed, loading only the models the request needs, segments the CT through the
ensemble with the gRPC client and samples the memory of the server's whole process group (server and Python stubs;
proportional set size, so shared-memory tensors count once). Then it runs the reference pipeline (wholebody.reference) in a child
process with the same weights and measures that process's peak RSS. It prints one table; the labels
column is the share of voxels on which the two label maps agree.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import tritonclient.grpc as grpcclient

from client.segmentation_client import SegmentationClient, ct_array, read_ct, write_label_map
from wholebody.bundle import install_bundle, load_network, make_test_bundle
from wholebody.contract import (
    ENSEMBLE,
    MODEL_REPOSITORY,
    POSTPROCESS,
    PREPROCESS,
    SLIDING_WINDOW,
    network_model_name,
)
from wholebody.reference import reference_segmentation
from wholebody.sample_data import real_ct, synthetic_ct
from wholebody.triton_server import DEFAULT_CACHE, LocalTritonServer

log = logging.getLogger("perf.reference_comparison")

CASES = ("example_ct", "synthetic_512x512x397")


def proportional_set_size(pid: int) -> int:
    """Bytes of memory one process accounts for (PSS: shared pages divided among their users).

    RSS would count the Python backend's shared-memory tensors once per process that maps them, so
    summing RSS over a server and its stubs overstates; summing PSS does not.
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def process_label(pid: int) -> str:
    """'tritonserver', or the model a Python backend stub serves (from its command line)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        return "?"
    if args and args[0].endswith(b"triton_python_backend_stub") and len(args) > 1:
        return Path(args[1].decode()).parent.parent.name  # <repo>/<model>/<version>/model.py
    return Path(args[0].decode()).name


@dataclass
class MemorySampler:
    """Samples the PSS of a server's process group in a background thread: the peak of the sum,
    and each process's own peak."""

    server: LocalTritonServer
    interval_s: float = 0.05
    peak_bytes: int = 0
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        labels: dict[int, str] = {}
        while not self._stop.is_set():
            total = 0
            for pid in self.server.pids():
                size = proportional_set_size(pid)
                label = labels.setdefault(pid, process_label(pid))
                self.peaks[label] = max(self.peaks.get(label, 0), size)
                total += size
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemorySampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def compute_seconds(client: grpcclient.InferenceServerClient, model: str) -> float:
    """Total compute time (input + infer + output) the server has spent in `model`, in seconds."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    return sum(int(stats[k].get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output")) / 1e9


def run_served(ct: Path, bundle: Path, resolution: str, out: Path) -> dict[str, float]:
    network = network_model_name(resolution, "torch_fp32")
    stages = {"pre": PREPROCESS, "sliding window": SLIDING_WINDOW, "invert": POSTPROCESS, "network": network}
    with tempfile.TemporaryDirectory(prefix="served-") as tmp:
        repo = Path(tmp) / "model_repository"
        shutil.copytree(MODEL_REPOSITORY, repo, ignore=shutil.ignore_patterns("*.pt", "*.plan", "*.onnx", "*.json"))
        install_bundle(bundle, repo)
        models = [ENSEMBLE, PREPROCESS, SLIDING_WINDOW, POSTPROCESS, network]
        with LocalTritonServer(model_repository=repo, models=models) as server:
            stats_client = grpcclient.InferenceServerClient(server.grpc_url)
            idle = sum(proportional_set_size(p) for p in server.pids())
            before = {k: compute_seconds(stats_client, m) for k, m in stages.items()}
            with MemorySampler(server) as memory, SegmentationClient(server.grpc_url) as seg:
                image = read_ct(ct)
                start = time.perf_counter()
                label_map = seg.segment(ct_array(image), image.affine, resolution=resolution, network="torch_fp32")
                request_s = time.perf_counter() - start
                write_start = time.perf_counter()
                write_label_map(label_map, image, out)
                write_s = time.perf_counter() - write_start
            result = {k: compute_seconds(stats_client, m) - before[k] for k, m in stages.items()}
    log.info(
        "served peak memory by process (GB): %s",
        ", ".join(f"{k} {v / 2**30:.2f}" for k, v in sorted(memory.peaks.items(), key=lambda kv: -kv[1])),
    )
    result.update(
        total=request_s + write_s, request=request_s, write=write_s, peak_gb=memory.peak_bytes / 2**30, idle_gb=idle / 2**30
    )
    return result


def run_reference_child(ct: Path, bundle: Path, resolution: str, out: Path) -> None:
    """In the child process: the reference pipeline, timings as JSON on stdout, labels to `out`."""
    torch.set_num_threads(os.cpu_count() or 1)
    network = load_network(bundle, resolution)
    start = time.perf_counter()
    result = reference_segmentation(ct, network, resolution)
    image = nib.load(ct)
    write_start = time.perf_counter()
    write_label_map(result.label_map, image, out)
    seconds = dict(result.seconds, write=time.perf_counter() - write_start)
    seconds["total"] = time.perf_counter() - start
    print(json.dumps(seconds))


def run_reference(ct: Path, bundle: Path, resolution: str, out: Path) -> dict[str, float]:
    """Run the reference in a child process; its peak RSS comes from the kernel's accounting."""
    cmd = [sys.executable, "-m", "perf.reference_comparison", "--reference-child", str(ct), str(bundle), resolution, str(out)]
    with tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(cmd, stdout=stdout)
        _, status, usage = os.wait4(process.pid, 0)  # reaps the child with its own resource usage
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            raise RuntimeError(f"reference pipeline failed with exit code {process.returncode}")
        stdout.seek(0)
        seconds = json.loads(stdout.read().strip().splitlines()[-1])
    seconds["peak_gb"] = usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux
    return seconds


def case_path(case: str, cache: Path) -> Path:
    if case == "example_ct":
        return real_ct("example_ct", cache)
    path = cache / "ct" / "synthetic_512x512x397.nii"
    if not path.exists():
        log.info("writing the synthetic 512x512x397 CT (0.84 x 0.84 x 1.5 mm, seed 0) to %s", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(synthetic_ct(), path)
    return path


def machine() -> str:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if "model name" in line),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Triton 2.51.0 (CPU)"


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--reference-child":
        ct, bundle, resolution, out = sys.argv[2:6]
        run_reference_child(Path(ct), Path(bundle), resolution, Path(out))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m perf.reference_comparison", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--bundle", type=Path, help="MONAI bundle directory (default: real-size random weights)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--resolution", choices=("lowres", "highres"), default="lowres")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bundle = args.bundle
    if bundle is None:
        bundle = args.cache / "bundle_f32"
        if not (bundle / "models" / "model_lowres.pt").exists():
            make_test_bundle(bundle, init_filters=32, seed=0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="comparison-") as tmp:
        for case in args.cases:
            ct = case_path(case, args.cache)
            shape = nib.load(ct).shape
            log.info("%s %s: served pipeline", case, list(shape))
            served = run_served(ct, bundle, args.resolution, Path(tmp) / f"{case}_served.nii.gz")
            log.info("%s: reference MONAI pipeline", case)
            reference = run_reference(ct, bundle, args.resolution, Path(tmp) / f"{case}_reference.nii.gz")
            a = np.asarray(nib.load(Path(tmp) / f"{case}_served.nii.gz").dataobj)
            b = np.asarray(nib.load(Path(tmp) / f"{case}_reference.nii.gz").dataobj)
            equal = float((a == b).mean())
            rows.append((case, served, reference, equal))
    print(f"\nMachine: {machine()}; resolution {args.resolution}; weights: {bundle}\n")
    print("| CT | pipeline | total s | pre s | sliding window s (network s) | post/invert s | write s | peak memory GB (served: PSS sum; reference: RSS) | labels equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, served, reference, equal in rows:
        print(
            f"| {case} | served (Triton, client time) | {served['total']:.1f} | {served['pre']:.1f} | "
            f"{served['sliding window']:.1f} ({served['network']:.1f}) | {served['invert']:.1f} | {served['write']:.1f} | "
            f"{served['peak_gb']:.2f} (idle {served['idle_gb']:.2f}) | {100 * equal:.4f} % |"
        )
        print(
            f"| {case} | reference (MONAI, in-process) | {reference['total']:.1f} | {reference['pre']:.1f} | "
            f"{reference['inferer']:.1f} | {reference['post']:.1f} | {reference['write']:.1f} | {reference['peak_gb']:.2f} | |"
        )
        print(f"| {case} | speedup | {reference['total'] / served['total']:.2f}x | | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
