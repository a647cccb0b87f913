"""Served pipeline vs the bundle's own MONAI pipeline, side by side in one run: time, memory, labels.

    python -m perf.reference_comparison                       # lowres, example_ct + 512x512x397 CT
    python -m perf.reference_comparison --bundle /path/to/wholeBody_ct_segmentation --cases example_ct

For each CT it starts a local Triton server (CPU configs) on a temporary copy of the model repository
with the bundle installed, loading only the models the request needs (no network model when the
sliding-window stage runs the network in its own process, `placement: in_process`), segments the CT through the
ensemble with the gRPC client and samples the memory of the server's whole process group (server and Python stubs:
private memory plus each shared-memory file, counted once; perf.run.host_memory_bytes). Then it runs the reference
pipeline (wholebody.reference) in a child process with the same weights, sampled the same way. It prints one table;
the labels column is the share of voxels on which the two label maps agree.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import tritonclient.grpc as grpcclient

from client.segmentation_client import SegmentationClient, ct_array, read_ct, write_label_map
from perf.run import MemorySampler, gpu_memory_from_nvidia_smi, host_memory_bytes, machine_info
from wholebody.bundle import copy_model_repository, install_bundle, load_network, make_test_bundle
from wholebody.contract import (
    ENSEMBLE,
    POSTPROCESS,
    PREPROCESS,
    SLIDING_WINDOW,
    network_model_name,
)
from wholebody.reference import reference_segmentation
from wholebody.served_models import models_to_load
from wholebody.sample_data import real_ct, synthetic_ct
from wholebody.triton_server import LocalTritonServer
from wholebody.triton_server.install import DEFAULT_CACHE

log = logging.getLogger("perf.reference_comparison")

CASES = ("example_ct", "synthetic_512x512x397")


def compute_seconds(client: grpcclient.InferenceServerClient, model: str) -> float:
    """Total compute time (input + infer + output) the server has spent in `model`, in seconds."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
    return sum(int(stats[k].get("ns", 0)) for k in ("compute_input", "compute_infer", "compute_output")) / 1e9


def run_served(
    ct: Path, bundle: Path, resolution: str, variant: str, device: str, out: Path, warmup: int = 0
) -> dict[str, float]:
    """Segment `ct` through a fresh local server; times from the client and the server's statistics.

    `warmup` untimed requests go first (CUDA context, cuDNN autotuning on a GPU).
    """
    network = network_model_name(resolution, variant)
    gpu = device == "gpu"
    config_name = None if gpu else "cpu"
    with tempfile.TemporaryDirectory(prefix="served-") as tmp:
        repo = Path(tmp) / "model_repository"
        install_bundle(bundle, copy_model_repository(repo))
        # the network model only where the sliding window calls it by BLS (not with placement in_process)
        models = models_to_load(repo, config_name, [ENSEMBLE, PREPROCESS, SLIDING_WINDOW, POSTPROCESS, network])
        stages = {"pre": PREPROCESS, "sliding window": SLIDING_WINDOW, "invert": POSTPROCESS}
        if network in models:
            stages["network"] = network
        extra = ["--cuda-memory-pool-byte-size=0:8589934592", "--pinned-memory-pool-byte-size=268435456"] if gpu else []
        server = LocalTritonServer(model_repository=repo, models=models, config_name=config_name, extra_args=extra)
        with server:
            stats_client = grpcclient.InferenceServerClient(server.grpc_url)
            image = read_ct(ct)
            with SegmentationClient(server.grpc_url) as seg:
                for _ in range(warmup):
                    seg.segment(ct_array(image), image.affine, resolution=resolution, network=variant)
            idle = host_memory_bytes(server.pids())
            gpu_idle = (gpu_memory_from_nvidia_smi() or 0) if gpu else 0
            before = {k: compute_seconds(stats_client, m) for k, m in stages.items()}
            assert server.process is not None
            sampler = MemorySampler(server_pid=server.process.pid, use_nvidia_smi=gpu, interval_s=0.05)
            with sampler as memory, SegmentationClient(server.grpc_url) as seg:
                start = time.perf_counter()
                label_map = seg.segment(ct_array(image), image.affine, resolution=resolution, network=variant)
                request_s = time.perf_counter() - start
                write_start = time.perf_counter()
                write_label_map(label_map, image, out)
                write_s = time.perf_counter() - write_start
            result = {k: compute_seconds(stats_client, m) - before[k] for k, m in stages.items()}
    result.update(
        total=request_s + write_s,
        request=request_s,
        write=write_s,
        peak_gb=(memory.peak_host or 0) / 2**30,
        idle_gb=idle / 2**30,
        gpu_peak_gb=(memory.peak_gpu or 0) / 2**30,
        gpu_idle_gb=gpu_idle / 2**30,
    )
    return result


def run_reference_child(
    ct: Path, bundle: Path, resolution: str, device: str, amp: bool, out: Path, warmup: int = 0
) -> None:
    """In the child process: the reference pipeline, timings as JSON on stdout, labels to `out`."""
    torch.set_num_threads(os.cpu_count() or 1)
    torch_device = torch.device("cuda" if device == "gpu" else "cpu")
    if torch_device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as the bundle's `initialize`
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    network = load_network(bundle, resolution).to(torch_device)
    for _ in range(warmup):
        reference_segmentation(ct, network, resolution, amp=amp)
    start = time.perf_counter()
    result = reference_segmentation(ct, network, resolution, amp=amp)
    image = nib.load(ct)
    write_start = time.perf_counter()
    write_label_map(result.label_map, image, out)
    seconds = dict(result.seconds, write=time.perf_counter() - write_start)
    seconds["total"] = time.perf_counter() - start
    if torch_device.type == "cuda":
        seconds["gpu_peak_gb"] = torch.cuda.max_memory_reserved() / 2**30
    print(json.dumps(seconds))


def run_reference(
    ct: Path, bundle: Path, resolution: str, device: str, amp: bool, out: Path, warmup: int = 0
) -> dict[str, float]:
    """Run the reference in a child process (its own process group), sampled as the server is.

    Its peak RSS from the kernel's accounting comes back as well (`rss_gb`: that includes library
    code, which the sampled figure leaves out for both pipelines).
    """
    cmd = [
        sys.executable, "-m", "perf.reference_comparison", "--reference-child",
        str(ct), str(bundle), resolution, device, "amp" if amp else "fp32", str(out), str(warmup),
    ]
    with tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(cmd, stdout=stdout, start_new_session=True)
        with MemorySampler(server_pid=process.pid, interval_s=0.05) as memory:
            _, status, usage = os.wait4(process.pid, 0)  # reaps the child with its own resource usage
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            raise RuntimeError(f"reference pipeline failed with exit code {process.returncode}")
        stdout.seek(0)
        seconds = json.loads(stdout.read().strip().splitlines()[-1])
    seconds["peak_gb"] = (memory.peak_host or 0) / 2**30
    seconds["rss_gb"] = usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux
    return seconds


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each measure's median over repeated runs (memory peaks too)."""
    return {key: float(np.median([run[key] for run in runs])) for key in runs[0]}


def case_path(case: str, cache: Path) -> Path:
    if case == "example_ct":
        return real_ct("example_ct", cache)
    path = cache / "ct" / "synthetic_512x512x397.nii"
    if not path.exists():
        log.info("writing the synthetic 512x512x397 CT (0.84 x 0.84 x 1.5 mm, seed 0) to %s", path)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(synthetic_ct(), path)
    return path


def machine(device: str) -> str:
    info = machine_info()
    text = f"{info['cpu']}, {info['cores']} cores, torch {torch.__version__}, Triton 2.51.0"
    if device == "gpu" and info["gpus"]:
        gpu = info["gpus"][0]
        text = f"{gpu['name']} (driver {gpu['driver']}), {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--reference-child":
        ct, bundle, resolution, device, precision, out, warmup = sys.argv[2:9]
        run_reference_child(Path(ct), Path(bundle), resolution, device, precision == "amp", Path(out), int(warmup))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m perf.reference_comparison", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--bundle", type=Path, help="MONAI bundle directory (default: real-size random weights)")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--resolution", choices=("lowres", "highres"), default="lowres")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="CPU configs, or the GPU ones")
    parser.add_argument(
        "--network", choices=("torch_fp32", "torch_amp"), default="torch_fp32",
        help="served variant; the reference runs fp32, or autocast (the bundle's amp=True) for torch_amp",
    )
    parser.add_argument(
        "--warmup", type=int, default=0, help="untimed runs of each pipeline first (use 1 on a GPU: cuDNN autotuning)"
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each pipeline, alternated; the table shows medians"
    )
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bundle = args.bundle
    if bundle is None:
        bundle = args.cache / "bundle_f32"
        if not (bundle / "models" / "model_lowres.pt").exists():
            make_test_bundle(bundle, init_filters=32, seed=0)
    amp = args.network == "torch_amp"
    rows = []
    with tempfile.TemporaryDirectory(prefix="comparison-") as tmp:
        for case in args.cases:
            ct = case_path(case, args.cache)
            log.info("%s %s: %s, served %s", case, list(nib.load(ct).shape), args.device, args.network)
            served_path, reference_path = Path(tmp) / f"{case}_served.nii.gz", Path(tmp) / f"{case}_reference.nii.gz"
            served_runs, reference_runs = [], []
            for repeat in range(args.repeats):  # alternated, so a change in the machine's speed hits both
                log.info("%s: served pipeline, run %d of %d", case, repeat + 1, args.repeats)
                served_runs.append(
                    run_served(ct, bundle, args.resolution, args.network, args.device, served_path, args.warmup)
                )
                log.info("%s: reference MONAI pipeline, run %d of %d", case, repeat + 1, args.repeats)
                reference_runs.append(
                    run_reference(ct, bundle, args.resolution, args.device, amp, reference_path, args.warmup)
                )
            served, reference = median_of(served_runs), median_of(reference_runs)
            equal = float((np.asarray(nib.load(served_path).dataobj) == np.asarray(nib.load(reference_path).dataobj)).mean())
            rows.append((case, served, reference, equal))
    gpu = args.device == "gpu"
    print(
        f"\nMachine: {machine(args.device)}; {args.resolution}; served {args.network}; weights: {bundle}; "
        f"median of {args.repeats} alternated run(s) each\n"
    )
    memory = "GPU peak GB (served: card; reference: torch reserved)" if gpu else "peak memory GB (reference: its peak RSS too)"
    print(f"| CT | pipeline | total s | pre s | sliding window s (network s) | post/invert s | write s | {memory} | labels equal |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case, served, reference, equal in rows:
        network = f"{served['network']:.2f}" if "network" in served else "in process"
        served_memory = (
            f"{served['gpu_peak_gb']:.2f} (idle {served['gpu_idle_gb']:.2f})" if gpu
            else f"{served['peak_gb']:.2f} (idle {served['idle_gb']:.2f})"
        )
        reference_memory = (
            f"{reference.get('gpu_peak_gb', 0.0):.2f}" if gpu else f"{reference['peak_gb']:.2f} (RSS {reference['rss_gb']:.2f})"
        )
        print(
            f"| {case} | served (Triton, client time) | {served['total']:.2f} | {served['pre']:.2f} | "
            f"{served['sliding window']:.2f} ({network}) | {served['invert']:.2f} | {served['write']:.2f} | "
            f"{served_memory} | {100 * equal:.4f} % |"
        )
        print(
            f"| {case} | reference (MONAI, in-process) | {reference['total']:.2f} | {reference['pre']:.2f} | "
            f"{reference['inferer']:.2f} | {reference['post']:.2f} | {reference['write']:.2f} | {reference_memory} | |"
        )
        print(f"| {case} | speedup | {reference['total'] / served['total']:.2f}x | | | | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
