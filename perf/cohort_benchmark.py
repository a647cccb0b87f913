"""python -m perf.cohort_benchmark: the cohort client's throughput, and the client's own time per scan.

1. A cohort of small synthetic CTs through local servers serving the small test network
   (`init_filters=8`, random weights), side by side in one run: 1 server x 1 request in flight,
   1 server x 2, 2 servers x 2. Scans per minute from the wall time of `client.cohort.run_cohort`.
2. The client's own time for one large CT (default 512x512x397, .nii.gz): read, send and receive
   (the request's wall time less the server's own time for it, from its statistics), write; for the
   client before this work (`git show BEFORE:client/segmentation_client.py`: nibabel + zlib, float32
   on the wire) and now (ISA-L gzip, int16 on the wire).

Prints one markdown table per part, naming the machine. Servers are started here on free loopback
ports (CPU configs) and stopped at the end. On a shared box the numbers move with the other load.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np
import tritonclient.grpc as grpcclient

from client.cohort import CohortOptions, run_cohort
from client.inputs import NiftiFormat, discover
from client.outputs import NiftiLabelMapWriter, plan_outputs
from client.segmentation_client import SegmentationClient, write_label_map
from perf.run import machine_info
from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.contract import ENSEMBLE, ENSEMBLE_INT16, REPO_ROOT
from wholebody.sample_data import synthetic_ct
from wholebody.triton_server import LocalTritonServer

log = logging.getLogger("perf.cohort_benchmark")

BEFORE = "ba4f2f0"  # the last commit of the one-file-at-a-time client
SETTINGS = ((1, 1), (1, 2), (2, 2))  # (servers, requests in flight per server)


def server_seconds(url: str, model: str) -> float:
    """Total time the server has spent on successful requests of `model`, in seconds."""
    stats = grpcclient.InferenceServerClient(url).get_inference_statistics(model, as_json=True)
    return int(stats["model_stats"][0]["inference_stats"]["success"].get("ns", 0)) / 1e9


def old_client(work: Path) -> ModuleType:
    """The client module as it was at BEFORE, imported from git under another name (file in `work`)."""
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:client/segmentation_client.py"],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True,
    ).stdout
    path = work / "segmentation_client_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("segmentation_client_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def cohort_rows(repo: Path, scans_dir: Path, out_root: Path, resolution: str) -> list[dict[str, Any]]:
    rows = []
    servers = [LocalTritonServer(model_repository=repo) for _ in range(max(s for s, _ in SETTINGS))]
    try:
        for server in servers:
            server.start()
        scans = discover([scans_dir]).scans
        writers = [NiftiLabelMapWriter()]
        # one warm-up scan per server: the first request of a stub loads its libraries
        for server in servers:
            with SegmentationClient(server.grpc_url) as seg:
                volume = scans[0].read_volume()
                seg.segment(volume.array, volume.affine, resolution=resolution)
        for count, jobs in SETTINGS:
            out = out_root / f"{count}x{jobs}"
            plan = plan_outputs(scans, out, writers, "_seg")
            urls = [s.grpc_url for s in servers[:count]]
            summary = run_cohort(plan, urls, CohortOptions(output_dir=out, resolution=resolution, jobs=jobs), writers)
            if summary.count("done") != len(scans):
                raise RuntimeError(f"{count}x{jobs}: {summary.line()}")
            rows.append({"servers": count, "jobs": jobs, "scans": len(scans), "wall": summary.wall_seconds,
                         "per_minute": summary.scans_per_minute})
            log.info("%d server(s) x %d: %s", count, jobs, summary.line())
    finally:
        for server in servers:
            server.stop()
    return rows


def client_time_rows(repo: Path, ct: Path, work: Path, resolution: str) -> list[dict[str, Any]]:
    before = old_client(work)
    rows = []
    with LocalTritonServer(model_repository=repo) as server:
        url = server.grpc_url

        def measure(name: str, read: Callable[[], Any], segment: Callable[[Any], np.ndarray],
                    write: Callable[[np.ndarray, Any], None], model: str) -> None:
            data, read_s = timed(read)
            server_before = server_seconds(url, model)
            labels, request_s = timed(lambda: segment(data))
            server_s = server_seconds(url, model) - server_before
            _, write_s = timed(lambda: write(labels, data))
            rows.append({"client": name, "read": read_s, "transfer": request_s - server_s, "server": server_s,
                         "write": write_s, "client_total": read_s + request_s - server_s + write_s})
            log.info("%s: %s", name, rows[-1])

        with before.SegmentationClient(url) as seg:
            measure(
                f"before ({BEFORE}: nibabel/zlib, float32)",
                lambda: (lambda image: (image, before.ct_array(image)))(before.read_ct(ct)),
                lambda data: seg.segment(data[1], data[0].affine, resolution=resolution),
                lambda labels, data: before.write_label_map(labels, data[0], work / "before_seg.nii.gz"),
                ENSEMBLE,
            )
        with SegmentationClient(url) as seg:
            seg.accepts_int16()
            measure(
                "now (ISA-L gzip, int16)",
                lambda: NiftiFormat().read_volume(ct),
                lambda volume: seg.segment(volume.array, volume.affine, resolution=resolution),
                lambda labels, volume: write_label_map(labels, volume, work / "now_seg.nii.gz"),
                ENSEMBLE_INT16,
            )
    same = np.array_equal(np.asarray(nib.load(work / "before_seg.nii.gz").dataobj),
                          np.asarray(nib.load(work / "now_seg.nii.gz").dataobj))
    for row in rows:
        row["labels_equal"] = same
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.cohort_benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--scans", type=int, default=8, help="cohort size (default 8)")
    parser.add_argument("--scan-shape", type=int, nargs=3, default=(40, 36, 30), metavar=("X", "Y", "Z"),
                        help="voxels of each cohort CT, 3 mm (default 40 36 30)")
    parser.add_argument("--large-shape", type=int, nargs=3, default=(512, 512, 397), metavar=("X", "Y", "Z"),
                        help="voxels of the CT for the client's own time (default 512 512 397, 0.84x0.84x1.5 mm)")
    parser.add_argument("--skip-cohort", action="store_true", help="only the client's own time")
    parser.add_argument("--skip-client-time", action="store_true", help="only the cohort table")
    parser.add_argument("--resolution", default="lowres", choices=["lowres", "highres"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = machine_info()
    with tempfile.TemporaryDirectory(prefix="cohort-benchmark-") as tmp:
        work = Path(tmp)
        repo = copy_model_repository(work / "model_repository")
        install_bundle(make_test_bundle(work / "bundle", init_filters=8, seed=0), repo)
        print(f"machine: {info['cpu']}, {info['cores']} cores; small test network (init_filters=8), "
              f"{args.resolution}, CPU configs; other work on this machine moves the numbers\n")
        if not args.skip_cohort:
            scans_dir = work / "cohort"
            for i in range(args.scans):
                path = scans_dir / f"s{i:04d}" / "ct.nii.gz"
                path.parent.mkdir(parents=True)
                nib.save(synthetic_ct(tuple(args.scan_shape), (3.0, 3.0, 3.0), seed=i), path)
            rows = cohort_rows(repo, scans_dir, work / "out", args.resolution)
            shape = "x".join(map(str, args.scan_shape))
            print(f"Cohort of {args.scans} CTs of {shape} voxels at 3 mm (python -m client ... -u ... --jobs N):\n")
            print("| servers x requests in flight | scans | wall s | scans per minute | vs 1 x 1 |")
            print("|---|---|---|---|---|")
            for row in rows:
                print(f"| {row['servers']} x {row['jobs']} | {row['scans']} | {row['wall']:.1f} | "
                      f"{row['per_minute']:.2f} | {row['per_minute'] / rows[0]['per_minute']:.2f}x |")
            print()
        if not args.skip_client_time:
            ct = work / "large_ct.nii.gz"
            nib.save(synthetic_ct(tuple(args.large_shape), (0.84, 0.84, 1.5), seed=0), ct)
            rows = client_time_rows(repo, ct, work, args.resolution)
            shape = "x".join(map(str, args.large_shape))
            print(f"Client's own time for one {shape} CT (.nii.gz, int16), shared memory, s:\n")
            print("| client | read | send + receive | write | client total | (server) | labels equal |")
            print("|---|---|---|---|---|---|---|")
            for row in rows:
                print(f"| {row['client']} | {row['read']:.2f} | {row['transfer']:.2f} | {row['write']:.2f} | "
                      f"**{row['client_total']:.2f}** | {row['server']:.1f} | {row['labels_equal']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
