"""The GPU measurements of the fast fp16 path, stage by stage, for one prepared device session.

    python -m perf.gpu_session --out DIR STAGE [STAGE ...]     # stages below, in this order
    python -m perf.gpu_session --out DIR --tiny --device cpu served baseline reference write transfer summary

Stages (each merges its figures into DIR/results.json; run each in its own process, as
perf/gpu_session.sh does, so that no stage holds a CUDA context while a server is measured):
  forward    in one process, no server: ms per window of the network variants (batch of 8) and the
             sliding window alone on a 287x287x397 volume: fp16 ring + compiled fp16 network against
             MONAI's sliding_window_inference under autocast (the bundle's amp), labels compared
  served     the GPU configs with the fast candidate (FAST_GPU_PARAMETERS: the fp16 network in-process,
             fp16 ring) set in a temporary copy:
             highres and lowres 512x512x397 and highres 512x512x800, client time (request + .nii.gz
             write), stage compute times, GPU memory on the card (nvidia-smi, every 50 ms);
             then perf_analyzer end2end (shared memory) through `python -m perf`
  baseline   the same with torch_fp32 by BLS, fp32 ring and an 8 GiB pool (the earlier H100 measurement)
  reference  the bundle's MONAI pipeline (wholebody.reference) in a child process: highres amp and fp32,
             lowres amp; label agreement with the served label maps
  write      the 512x512x397 label map as .nii.gz: nibabel + zlib (the client today) vs python-isal
  transfer   what INT16 input would save: float32 vs int16 volume into a shared-memory region and host
             to GPU
  summary    DIR/summary.md: the table against the issue's goals

`--tiny` (with `--device cpu`) runs the same code on small CTs, a small network and the CPU configs
(in-process placement switched on in a temporary copy), to check the script before spending GPU time.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from client.segmentation_client import SegmentationClient, ct_array, read_ct, write_label_map
from perf.reference_comparison import compute_seconds, run_reference
from perf.run import MemorySampler, gpu_memory_from_nvidia_smi, machine_info
from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.contract import ENSEMBLE, POSTPROCESS, PREPROCESS, RESOLUTIONS, SLIDING_WINDOW, network_model_name
from wholebody.sample_data import synthetic_ct
from wholebody.triton_server import LocalTritonServer

log = logging.getLogger("perf.gpu_session")

STAGES = ("forward", "served", "baseline", "reference", "write", "transfer", "summary")
GIB = 2**30
# Goals of issue 13 (H100/H200, 512x512x397).
GOAL_SERVER_S, GOAL_CLIENT_S, GOAL_GPU_GIB, GOAL_LOWRES_S = 0.8, 2.0, 8.0, 0.15
# Triton's CUDA pool: it carries the stages' outputs between processes (normalized image, label maps:
# 0.3 + 0.07 + 0.2 GB for 512x512x800 at 1.5 mm), no logits once the network runs in-process.
NEW_POOL = "--cuda-memory-pool-byte-size=0:1073741824"
OLD_POOL = "--cuda-memory-pool-byte-size=0:8589934592"  # the previous default: 8 windows of fp32 logits
# The candidate GPU settings of model_repository/sliding_window/config.pbtxt that this session measures.
FAST_GPU_PARAMETERS = {
    "placement": "in_process", "blend_dtype": "float16", "default_network": "torch_fp16",
    "preload_networks": "torch_fp16", "release_cuda_cache": "yes",
}


def torch_fp16_config(resolution: str) -> str:
    """config.pbtxt of the GPU-only network model segresnet_<resolution>_torch_fp16 (measured here only).

    `.half()` weights, compiled by torch.compile for batches of 8 windows (smaller batches padded),
    warmed up at load; the contract of every network model (window FP32 [batch, 1, 96, 96, 96] in,
    logits FP32 [batch, 105, 96, 96, 96] out). It is not in model_repository/: no GPU has run it yet,
    and `tritonserver --model-repository=model_repository` loads every model there.
    """
    name = network_model_name(resolution, "torch_fp16")
    params = {
        "precision": "fp16", "checkpoint": RESOLUTIONS[resolution].checkpoint, "memory_format": "contiguous",
        "compile": "default", "fixed_batch": "8", "FORCE_CPU_ONLY_INPUT_TENSORS": "no",
    }
    lines = [
        f'name: "{name}"', 'backend: "python"', "max_batch_size: 8",
        'input [ { name: "window" data_type: TYPE_FP32 dims: [ 1, 96, 96, 96 ] } ]',
        'output [ { name: "logits" data_type: TYPE_FP32 dims: [ 105, 96, 96, 96 ] } ]',
        "dynamic_batching { }", "instance_group [ { kind: KIND_GPU count: 1 } ]",
    ]
    return set_parameters("\n".join(lines) + "\n", **params)


def add_torch_fp16_models(repo: Path) -> None:
    """Add segresnet_{highres,lowres}_torch_fp16 to a copy of the model repository (before install_bundle).

    Their model.py is the torch_fp32 models' own (the one TorchNetworkModel of wholebody.triton_python).
    """
    for resolution in RESOLUTIONS:
        folder = repo / network_model_name(resolution, "torch_fp16")
        (folder / "1").mkdir(parents=True, exist_ok=True)
        (folder / "config.pbtxt").write_text(torch_fp16_config(resolution))
        shutil.copyfile(repo / network_model_name(resolution, "torch_fp32") / "1" / "model.py", folder / "1" / "model.py")


class Session:
    def __init__(self, args: argparse.Namespace) -> None:
        self.out: Path = args.out
        self.tiny: bool = args.tiny
        self.gpu = args.device == "gpu"
        self.work = args.work / ("tiny" if self.tiny else "full")
        self.work.mkdir(parents=True, exist_ok=True)
        self.results_path = self.out / "results.json"
        self.results: dict[str, Any] = json.loads(self.results_path.read_text()) if self.results_path.exists() else {}

    def save(self, stage: str, figures: dict[str, Any]) -> None:
        self.results[stage] = figures
        self.results_path.write_text(json.dumps(self.results, indent=1))
        log.info("%s: %s", stage, json.dumps(figures))

    # --- inputs -----------------------------------------------------------------------------------
    def bundle(self) -> Path:
        path = self.work / "bundle"
        if not (path / "models" / "model_lowres.pt").exists():
            make_test_bundle(path, init_filters=8 if self.tiny else 32, seed=0)
        return path

    def ct(self, slices: int) -> Path:
        shape = (64, 60, slices // 8) if self.tiny else (512, 512, slices)
        path = self.work / f"ct_{'x'.join(map(str, shape))}.nii"
        if not path.exists():
            nib.save(synthetic_ct(shape), path)
        return path

    def repository(self, name: str, edit: Callable[[str], str] | None = None) -> Path:
        repo = self.work / name / "model_repository"
        if repo.exists():
            shutil.rmtree(repo.parent)
        add_torch_fp16_models(copy_model_repository(repo))
        install_bundle(self.bundle(), repo)
        sw = repo / SLIDING_WINDOW / ("configs/cpu.pbtxt" if not self.gpu else "config.pbtxt")
        if self.tiny and not self.gpu:  # the CPU dry run: the same code path, CPU network
            sw.write_text(set_parameters(sw.read_text(), placement="in_process", blend_dtype="float16",
                                         network_config="configs/cpu.pbtxt"))
        if edit is not None:
            sw.write_text(edit(sw.read_text()))
        return repo

    def server(self, repo: Path, models: list[str], pool: str, name: str) -> LocalTritonServer:
        extra = [pool, "--pinned-memory-pool-byte-size=268435456", "--allow-gpu-metrics=true"] if self.gpu else []
        return LocalTritonServer(
            model_repository=repo, models=models, config_name=None if self.gpu else "cpu", extra_args=extra,
            log_path=self.out / f"tritonserver-{name}.log", startup_timeout_s=600,
        )

    def variant(self, new: bool) -> str:
        if new:
            return "torch_fp16" if self.gpu else "torch_fp32"
        return "torch_fp32"


def gpu_processes() -> list[str]:
    """nvidia-smi's compute processes (pid, name, MiB): one CUDA context each."""
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def set_parameters(config: str, **values: str) -> str:
    """A config.pbtxt's text with `parameters` set (replaced where present, added otherwise)."""
    for key, value in values.items():
        line = f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}'
        pattern = rf'parameters \{{ key: "{re.escape(key)}" value: \{{ string_value: "[^"]*" \}} \}}'
        config, count = re.subn(pattern, line, config)
        if not count:
            config = config.rstrip("\n") + "\n" + line + "\n"
    return config


def drop_parameter(config: str, key: str) -> str:
    return re.sub(rf'parameters \{{ key: "{re.escape(key)}" value: \{{ string_value: "[^"]*" \}} \}}\n', "", config)


# --- forward ------------------------------------------------------------------------------------
def stage_forward(s: Session) -> None:
    import torch
    from monai.inferers import sliding_window_inference

    from wholebody.contract import ROI_SIZE
    from wholebody.sliding_window import sliding_window_label_map
    from wholebody.torch_network import NetworkSettings, TorchNetwork

    device = torch.device("cuda" if s.gpu else "cpu")
    repo = s.repository("forward")
    version = repo / network_model_name("highres", "torch_fp16") / "1"
    batch = 8 if s.gpu else 2
    side = 96 if s.gpu else 32
    settings = {"amp (autocast fp16)": NetworkSettings("model.pt", precision="amp")}
    if s.gpu:
        settings["fp16 (.half())"] = NetworkSettings("model.pt", precision="fp16")
        settings["fp16 + torch.compile (served)"] = NetworkSettings("model.pt", "fp16", compile="default",
                                                                    fixed_batch=batch)
    windows = torch.randn(batch, 1, side, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    per_window, nets = {}, {}
    for name, setting in settings.items():
        net = TorchNetwork(version, setting, device)
        warm = net.warm_up() if setting.fixed_batch else 0.0
        times = []
        for _ in range(6 if s.gpu else 2):
            net(windows)
            if s.gpu:
                torch.cuda.synchronize()
            start = time.perf_counter()
            net(windows)
            if s.gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        per_window[name] = {"ms_per_window": 1000 * statistics.median(times[1:]) / batch, "warm_up_s": warm}
        nets[name] = net
        log.info("%s: %.2f ms per window (batch %d), warm-up %.1f s", name, per_window[name]["ms_per_window"],
                 batch, warm)
    figures: dict[str, Any] = {"batch": batch, "per_window": per_window}

    shape = (287, 287, 397) if s.gpu else (40, 36, 50)
    volume = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    roi = ROI_SIZE if s.gpu else (32, 32, 32)
    fast = nets["fp16 + torch.compile (served)" if s.gpu else "amp (autocast fp16)"]

    def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
        if s.gpu:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = fn()
        if s.gpu:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GIB if s.gpu else 0.0
        return result, time.perf_counter() - start, peak

    runs = {}
    for ring in ("float16", "float32"):
        dtype = getattr(torch, ring)
        timed(lambda: sliding_window_label_map(volume, fast, roi, sw_batch_size=batch, blend_dtype=dtype))
        labels, seconds, peak = timed(
            lambda: sliding_window_label_map(volume, fast, roi, sw_batch_size=batch, blend_dtype=dtype)
        )
        runs[ring] = labels
        figures[f"sliding_window_{ring}_ring_s"], figures[f"sliding_window_{ring}_ring_peak_gib"] = seconds, peak
    amp_net = nets["amp (autocast fp16)"].eager

    def monai_amp() -> Any:
        with torch.inference_mode(), torch.autocast(device.type, enabled=s.gpu):
            return sliding_window_inference(
                volume[None, None], roi, 1, amp_net, overlap=0.25, mode="gaussian", padding_mode="replicate"
            )[0].argmax(0)

    expected, seconds, peak = timed(monai_amp)
    figures.update(monai_amp_sw_batch1_s=seconds, monai_amp_peak_gib=peak, volume=list(shape))
    for ring, labels in runs.items():
        figures[f"agreement_{ring}_ring_vs_monai_amp"] = float((labels.long() == expected).float().mean())
    figures["agreement_float16_vs_float32_ring"] = float((runs["float16"] == runs["float32"]).float().mean())
    s.save("forward", figures)


# --- served ----------------------------------------------------------------------------------------
def segment_once(url: str, ct: Path, resolution: str, variant: str, out: Path, warmup: int, repeats: int,
                 stages: dict[str, str]) -> dict[str, Any]:
    """Client time (request + .nii.gz write), stage compute times and the card's peak (medians of `repeats`)."""
    import tritonclient.grpc as grpcclient

    stats_client = grpcclient.InferenceServerClient(url)
    image = read_ct(ct)
    array = ct_array(image)
    with SegmentationClient(url) as seg:
        for _ in range(warmup):
            seg.segment(array, image.affine, resolution=resolution, network=variant)
    runs = []
    for _ in range(repeats):
        before = {k: compute_seconds(stats_client, m) for k, m in stages.items()}
        with MemorySampler(use_nvidia_smi=True, interval_s=0.05) as memory, SegmentationClient(url) as seg:
            start = time.perf_counter()
            label_map = seg.segment(array, image.affine, resolution=resolution, network=variant)
            request_s = time.perf_counter() - start
        start = time.perf_counter()
        write_label_map(label_map, image, out)
        write_s = time.perf_counter() - start
        run = {k: compute_seconds(stats_client, m) - before[k] for k, m in stages.items()}
        run.update(request_s=request_s, write_s=write_s, total_s=request_s + write_s,
                   gpu_peak_gib=(memory.peak_gpu or 0) / GIB)
        runs.append(run)
    stats_client.close()
    result = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    result["shape"] = list(array.shape)
    return result


def perf_end2end(s: Session, server: LocalTritonServer, resolution: str, variant: str, fresh: bool) -> None:
    """`python -m perf end2end` against the running server; tables land in DIR/perf_results/<machine>/."""
    from perf.__main__ import main as perf_main

    assert server.process is not None
    argv = [
        "end2end", "-u", server.grpc_url, "--server-pid", str(server.process.pid),
        "--resolution", resolution, "--variants", variant, "--requests", "2" if s.tiny else "4",
        "--warmup-requests", "1", "--out", str(s.out / "perf_results"),
    ]
    if s.gpu:
        argv += ["--metrics-url", server.metrics_url]
    if fresh:
        argv.append("--fresh")
    if s.tiny:
        argv += ["--ct-shape", "64,60,50"]
    rc = perf_main(argv)
    if rc:
        log.error("python -m perf %s returned %d", " ".join(argv), rc)


def served_stage(s: Session, name: str, new: bool) -> None:
    variant = s.variant(new)
    if new and s.gpu:
        repo = s.repository(name, lambda text: set_parameters(text, **FAST_GPU_PARAMETERS))
    elif new:
        repo = s.repository(name)
    else:
        def edit(text: str) -> str:
            text = set_parameters(text, placement="bls", blend_dtype="float32", default_network="torch_fp32")
            return drop_parameter(text, "preload_networks")

        repo = s.repository(name, edit)
    models = [ENSEMBLE, PREPROCESS, SLIDING_WINDOW, POSTPROCESS]
    if not new:
        models += [network_model_name(r, variant) for r in ("highres", "lowres")]
    cases = [("highres", 397), ("lowres", 397)] + ([("highres", 800)] if new else [])
    figures: dict[str, Any] = {"variant": variant, "pool": NEW_POOL if new else OLD_POOL}
    start = time.perf_counter()
    with s.server(repo, models, NEW_POOL if new else OLD_POOL, name) as server:
        figures["server_start_s"] = time.perf_counter() - start
        figures["gpu_idle_gib"] = (gpu_memory_from_nvidia_smi() or 0) / GIB
        for resolution, slices in cases:
            stages = {"pre": PREPROCESS, "sliding_window": SLIDING_WINDOW, "invert": POSTPROCESS}
            if not new:
                stages["network"] = network_model_name(resolution, variant)
            out = s.work / f"{name}_{resolution}_{slices}.nii.gz"
            key = f"{resolution}_{slices}"
            figures[key] = segment_once(server.grpc_url, s.ct(slices), resolution, variant, out,
                                        warmup=1, repeats=2 if new and slices == 397 else 1, stages=stages)
            log.info("%s %s: %s", name, key, figures[key])
        figures["gpu_idle_after_gib"] = (gpu_memory_from_nvidia_smi() or 0) / GIB
        figures["gpu_processes"] = gpu_processes()
        s.save(name, figures)
        for resolution in ("highres", "lowres"):
            perf_end2end(s, server, resolution, variant, fresh=new and resolution == "highres")
    s.save(name, figures)


# --- reference ---------------------------------------------------------------------------------------
def stage_reference(s: Session) -> None:
    figures: dict[str, Any] = {}
    ct = s.ct(397)
    for resolution, amp in (("highres", True), ("lowres", True)):
        key = f"{resolution}_{'amp' if amp else 'fp32'}"
        out = s.work / f"reference_{key}.nii.gz"
        seconds = run_reference(ct, s.bundle(), resolution, "gpu" if s.gpu else "cpu", amp, out, warmup=1)
        reference = np.asarray(nib.load(out).dataobj)
        figures[key] = dict(seconds)
        for name in ("served", "baseline"):
            served_path = s.work / f"{name}_{resolution}_397.nii.gz"
            if served_path.exists():
                served = np.asarray(nib.load(served_path).dataobj)
                figures[key][f"agreement_{name}"] = float((served == reference).mean())
        log.info("reference %s: %s", key, figures[key])
        s.save("reference", figures)


# --- write and transfer -----------------------------------------------------------------------------
def stage_write(s: Session) -> None:
    import gzip
    import zlib

    try:
        from isal import igzip  # python-isal: on the device it comes with the packed wheels
    except ImportError:
        s.save("write", {"error": "python-isal is not installed"})
        return

    path = s.work / "served_highres_397.nii.gz"
    if not path.exists():
        path = s.work / "baseline_highres_397.nii.gz"
    image = nib.load(path)
    labels = np.asarray(image.dataobj)
    figures: dict[str, Any] = {"bytes": int(labels.nbytes)}
    target = s.work / "write_test.nii.gz"
    times = []
    for _ in range(3):
        start = time.perf_counter()
        write_label_map(labels, image, target)
        times.append(time.perf_counter() - start)
    figures["nibabel_zlib_s"], figures["nibabel_zlib_bytes"] = statistics.median(times), target.stat().st_size
    raw = nib.Nifti1Image(labels, image.affine, image.header).to_bytes()  # the .nii bytes nibabel would gzip
    start = time.perf_counter()
    raw = nib.Nifti1Image(labels, image.affine, image.header).to_bytes()
    figures["nifti_bytes_s"] = time.perf_counter() - start
    for level in (1, 2):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            data = igzip.compress(raw, compresslevel=level)
            target.write_bytes(data)
            times.append(time.perf_counter() - start)
        assert gzip.decompress(data) == raw
        figures[f"isal_level{level}_s"] = statistics.median(times) + figures["nifti_bytes_s"]
        figures[f"isal_level{level}_bytes"] = len(data)
    start = time.perf_counter()
    data = zlib.compress(raw, 1)
    figures["zlib_level1_compress_only_s"] = time.perf_counter() - start
    reread = np.asarray(nib.load(target).dataobj)
    figures["isal_file_reads_back_equal"] = bool(np.array_equal(reread, labels))
    s.save("write", figures)


def stage_transfer(s: Session) -> None:
    """Bytes the client moves: the CT as float32 (today) or int16 (as stored), into shared memory and to the GPU."""
    import tritonclient.utils.shared_memory as shm

    image = read_ct(s.ct(397))
    stored = np.array(image.dataobj)  # in memory (not a memory map of the file): conversion timed alone
    figures: dict[str, Any] = {"stored_dtype": str(stored.dtype)}
    for dtype in ("float32", "int16"):
        start = time.perf_counter()
        array = np.ascontiguousarray(stored.astype(dtype, copy=False))
        convert_s = time.perf_counter() - start
        name = f"wb_transfer_{dtype}"
        handle = shm.create_shared_memory_region(name, f"/{name}", array.nbytes)
        try:
            times = []
            for _ in range(3):
                start = time.perf_counter()
                shm.set_shared_memory_region(handle, [array])
                times.append(time.perf_counter() - start)
        finally:
            shm.destroy_shared_memory_region(handle)
        figures[dtype] = {
            "bytes": int(array.nbytes), "convert_s": convert_s, "to_shared_memory_s": statistics.median(times),
        }
        if s.gpu:
            import torch

            host = torch.from_numpy(array)
            torch.empty(1, device="cuda")
            for label, tensor in (("pageable", host), ("pinned", host.pin_memory())):
                times = []
                for _ in range(3):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    tensor.to("cuda", non_blocking=False).float()
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                figures[dtype][f"to_gpu_{label}_s"] = statistics.median(times)
    s.save("transfer", figures)


# --- summary ------------------------------------------------------------------------------------------
def perf_latency_s(s: Session, resolution: str, variant: str) -> float | None:
    for manifest in (s.out / "perf_results").glob("*/raw/manifest.json"):
        for run in json.loads(manifest.read_text()).get("runs", []):
            if run["resolution"] == resolution and run["variant"] == variant and run["status"] == "ok":
                from perf.tables import measured

                return measured(manifest.parent, _run(run)).latency_us / 1e6
    return None


def _run(data: dict[str, Any]) -> Any:
    from perf.scenarios import Run

    return Run.from_json(data)


def fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def stage_summary(s: Session) -> None:
    r = s.results
    new, old, ref = r.get("served", {}), r.get("baseline", {}), r.get("reference", {})
    lines = [f"# GPU session: {json.dumps(machine_info().get('gpus'))}", ""]
    lines += ["| measure (512x512x397) | goal | fp16 in-process (candidate) | torch_fp32 by BLS (old) "
              "| MONAI reference |", "|---|---|---|---|---|"]
    for resolution, goal in (("highres", GOAL_SERVER_S), ("lowres", GOAL_LOWRES_S)):
        fast, fp32 = perf_latency_s(s, resolution, s.variant(True)), perf_latency_s(s, resolution, "torch_fp32")
        lines.append(f"| perf_analyzer end2end {resolution}, s | <= {goal} | {fmt(fast, 3)} | {fmt(fp32, 3)} | |")
    for resolution in ("highres", "lowres"):
        n, o = new.get(f"{resolution}_397", {}), old.get(f"{resolution}_397", {})
        reference = ref.get(f"{resolution}_amp", {})
        lines.append(
            f"| client {resolution}: total s (request + write) | {'<= 2' if resolution == 'highres' else ''} "
            f"| {fmt(n.get('total_s'))} ({fmt(n.get('request_s'))} + {fmt(n.get('write_s'))}) "
            f"| {fmt(o.get('total_s'))} ({fmt(o.get('request_s'))} + {fmt(o.get('write_s'))}) "
            f"| {fmt(reference.get('total'))} (amp) |"
        )
        lines.append(
            f"| {resolution} stages pre / sliding window / invert, s | | "
            f"{fmt(n.get('pre'), 3)} / {fmt(n.get('sliding_window'), 3)} / {fmt(n.get('invert'), 3)} | "
            f"{fmt(o.get('pre'), 3)} / {fmt(o.get('sliding_window'), 3)} / {fmt(o.get('invert'), 3)} | "
            f"{fmt(reference.get('pre'), 3)} / {fmt(reference.get('inferer'), 3)} / {fmt(reference.get('post'), 3)} |"
        )
        lines.append(
            f"| {resolution} GPU peak on the card, GiB | {'<= 8' if resolution == 'highres' else ''} "
            f"| {fmt(n.get('gpu_peak_gib'))} | {fmt(o.get('gpu_peak_gib'))} "
            f"| {fmt(reference.get('gpu_peak_gb'))} (torch reserved) |"
        )
        agree = {k: fmt(100 * reference[f"agreement_{k}"], 4) if f"agreement_{k}" in reference else "n/a"
                 for k in ("served", "baseline")}
        lines.append(f"| {resolution} labels equal to the MONAI amp pipeline, % | >= 99.5 | {agree['served']} "
                     f"| {agree['baseline']} | |")
    big = new.get("highres_800", {})
    lines.append(f"| highres 512x512x800: client s / GPU peak GiB | <= 8 GiB | {fmt(big.get('total_s'))} / "
                 f"{fmt(big.get('gpu_peak_gib'))} | | |")
    lines.append(f"| GPU idle after load / after requests, GiB | | {fmt(new.get('gpu_idle_gib'))} / "
                 f"{fmt(new.get('gpu_idle_after_gib'))} | {fmt(old.get('gpu_idle_gib'))} / "
                 f"{fmt(old.get('gpu_idle_after_gib'))} | |")
    lines += ["", "```json", json.dumps({k: r.get(k) for k in ("forward", "write", "transfer")}, indent=1), "```"]
    (s.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m perf.gpu_session", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("stages", nargs="+", choices=STAGES)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, summary.md, logs")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--tiny", action="store_true", help="small CTs and network: check the script on the CPU")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "wholebody-gpu-session",
                        help="bundle, CTs, repositories and label maps (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args.out.mkdir(parents=True, exist_ok=True)
    session = Session(args)
    actions: dict[str, Callable[[Session], None]] = {
        "forward": stage_forward,
        "served": lambda s: served_stage(s, "served", new=True),
        "baseline": lambda s: served_stage(s, "baseline", new=False),
        "reference": stage_reference,
        "write": stage_write,
        "transfer": stage_transfer,
        "summary": stage_summary,
    }
    for stage in args.stages:
        log.info("stage %s", stage)
        actions[stage](session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
