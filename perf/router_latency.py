"""Time from the last C-STORE of a CT to its DICOM-SEG arriving at the PACS, split by stage (issue 18,
"Measure and report"), and the router's overhead beyond the segmentation itself.

Everything is real and on loopback: a tritonserver serving a bundle with seeded random weights of the
real architecture (or `--init-filters` fewer channels), the router's Orthanc (receives) and a second
Orthanc (the PACS), dcmtk's storescu, and the router (router.service.Router, in this process so its
stage stamps and this script's share one clock). Stages, from the router's record of the series:

  stable wait   end of storescu -> series recorded queued (Orthanc's StableAge + the feed's polling)
  queue         recorded -> a worker took it
  download      the series' instances fetched in parallel (GET /instances/{id}/file; perf/router_download.py
                compares it with the zip archive the router fetched before)
  read          DICOM -> volume (clinical.dicom_series.read_ct_series)
  segmentation  SegmentationClient.segment through Triton (shared memory on loopback)
  SEG encode    router.results.results_for (write_dicom_seg, BINARY)
  quality       the structure statistics and clinical.quality.check_scan (policy: every check "report", so
                the random-weights result is not held back)
  SR            clinical.structured_report: the TID 1500 SR referencing the SEG, made and written
  store         POST /instances of the SEG and the SR into the router's Orthanc
  forward       Orthanc's C-STORE of both to the PACS (/modalities/pacs/store, synchronous: it returns once
                the PACS stored them)
The end is when this script sees the SEG in the PACS (REST, polled every 0.1 s); what the stages do not
cover (recording the outcome, the polling) is the "between stages" row.

  python -m perf.router_latency --ct synthetic --resolution lowres        # 512x512x397, 0.84x0.84x1.5 mm
  python -m perf.router_latency --ct example --init-filters 8             # the real 122x101x112 CT, quick

Prints a Markdown table naming the machine; `--json FILE` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import nibabel as nib
import numpy as np

from perf.client_footprint import machine
from router.orthanc import Modality, OrthancClient, OrthancNode, free_port
from router.rules import Rules
from router.service import Router, RouterConfig
from router.state import SeriesRow, StateStore

log = logging.getLogger("perf.router_latency")
T = TypeVar("T")

STAGES = (("stable wait", "stable_wait_s"), ("queue", "queue_s"), ("download", "download_s"), ("read", "read_s"),
          ("segmentation", "segment_s"), ("SEG encode", "seg_encode_s"),
          ("quality checks (and the statistics the SR reuses)", "quality_s"), ("SR (TID 1500) make + write", "sr_s"),
          ("store (SEG + SR)", "store_s"),
          ("forward (synchronous C-STORE: the SEG is at the PACS when it returns)", "forward_s"))


def ct_image(name: str) -> tuple[nib.Nifti1Image, str]:
    from wholebody.sample_data import real_ct, synthetic_ct

    if name == "synthetic":
        return synthetic_ct(), "synthetic body-like CT 512x512x397, 0.84x0.84x1.5 mm (wholebody.sample_data)"
    image = nib.load(real_ct("example_ct" if name == "example" else "aorta_ct"))
    shape = "x".join(str(s) for s in image.shape)
    kind = "abdomen" if name == "example" else "chest angiogram"
    return image, f"real CT ({kind}) {shape} (TotalSegmentator's tests)"


def rows(state_path: Path, status: str) -> list[SeriesRow]:
    with StateStore(state_path) as store:
        return store.rows(status)


def wait_for(ready: Callable[[], T], state_path: Path, every_s: float = 0.1) -> T:
    """Poll `ready()` every `every_s` until it returns something true, and return that; raise RuntimeError
    with the router's message as soon as the router has failed the series (`state_path`: its state)."""
    while True:
        value = ready()
        if value:
            return value
        failed = rows(state_path, "failed")
        if failed:
            raise RuntimeError(f"the router failed the series: {failed[0].message}")
        time.sleep(every_s)


def measure(args: argparse.Namespace, work: Path) -> dict[str, object]:
    from clinical.dicom_series import write_ct_series
    from clinical.quality import CHECKS, QualityPolicy
    from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
    from wholebody.triton_server import LocalTritonServer

    image, what = ct_image(args.ct)
    folder = work / "ct"
    write_ct_series(np.asarray(image.dataobj, dtype=np.int16), image.affine, folder, series_description="CT perf")
    bundle = make_test_bundle(work / "bundle", init_filters=args.init_filters, seed=0)
    repo = copy_model_repository(work / "model_repository")
    install_bundle(bundle, repo)
    router_dicom = free_port()
    with LocalTritonServer(model_repository=repo, watchdog=True, startup_timeout_s=args.startup_timeout) as triton, \
         OrthancNode(name="pacs", aet="PACS", storage=work / "pacs" / "storage",
                     senders={"router": Modality("WHOLEBODY", "127.0.0.1", router_dicom)}) as pacs, \
         OrthancNode(dicom_port=router_dicom, stable_age_s=args.stable_age, storage=work / "node" / "storage",
                     pacs={"pacs": Modality("PACS", "127.0.0.1", pacs.dicom_port)}) as node:
        config = RouterConfig(orthanc_url=node.url, triton_urls=[triton.grpc_url], state_dir=work / "state",
                              rules=Rules(slice_thickness_mm=None), pacs="pacs", poll_s=args.poll_seconds,
                              resolution=args.resolution, max_attempts=1,
                              # random weights trip the checks; "report" lets the result reach the PACS while
                              # the checks and the SR are still made and timed
                              quality_policy=QualityPolicy({check: "report" for check in CHECKS}))
        router = Router(config)
        router.start()
        try:
            push_start = time.time()
            sent = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", node.aet, "127.0.0.1", str(node.dicom_port),
                                   "+sd", str(folder)], capture_output=True, text=True, check=False)
            last_store = time.time()
            if sent.returncode != 0:
                raise RuntimeError(f"storescu failed: {sent.stderr[-500:]}")
            pacs_client = OrthancClient(pacs.url)
            find_seg = {"Level": "Instance", "Query": {"Modality": "SEG"}}
            wait_for(lambda: pacs_client._call("POST", "/tools/find", json=find_seg).json(), config.state_path)
            arrived = time.time()
            # the forward returns (and the outcome is recorded) just after the PACS stored the SEG
            done = wait_for(lambda: rows(config.state_path, "done"), config.state_path)
        finally:
            router.stop()
    s = done[0].stages
    stages = {
        "stable_wait_s": s["queued_at"] - last_store, "queue_s": s["started_at"] - s["queued_at"],
        **{k: s[k] for k in ("download_s", "read_s", "segment_s", "seg_encode_s", "quality_s", "sr_s", "store_s",
                             "forward_s")},
    }
    total = arrived - last_store
    return {"ct": what, "slices": len(list(folder.iterdir())), "push_s": last_store - push_start,
            "stages": stages, "total_s": total, "resolution": args.resolution or "server default",
            "init_filters": args.init_filters, "stable_age_s": args.stable_age, "poll_s": args.poll_seconds,
            "machine": machine()}


def table(result: dict[str, object]) -> str:
    stages: dict[str, float] = result["stages"]  # type: ignore[assignment]
    total = float(result["total_s"])  # type: ignore[arg-type]
    segment = stages["segment_s"]
    lines = [f"Machine: {result['machine']}",
             f"CT: {result['ct']}; {result['slices']} slices pushed by storescu in {result['push_s']:.1f} s; "
             f"resolution {result['resolution']}; network init_filters {result['init_filters']} "
             f"(32 = the real width), random weights; Orthanc StableAge {result['stable_age_s']} s, "
             f"feed polled every {result['poll_s']} s",
             "", "| stage | seconds | share |", "|---|---:|---:|"]
    for label, key in STAGES:
        lines.append(f"| {label} | {stages[key]:.2f} | {100 * stages[key] / total:.0f} % |")
    rest = total - sum(stages.values())
    lines.append(f"| (between stages, recording, this script's polling) | {rest:.2f} | {100 * rest / total:.0f} % |")
    lines.append(f"| **last C-STORE -> SEG at the PACS** | **{total:.2f}** | 100 % |")
    overhead = total - segment
    lines.append(f"| router overhead beyond segmentation | {overhead:.2f} | {100 * overhead / total:.0f} % |")
    fixed = stages["stable_wait_s"]
    lines.append(f"| of which the stable wait (StableAge) | {fixed:.2f} | {100 * fixed / total:.0f} % |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf.router_latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", choices=("synthetic", "example", "aorta"), default="synthetic")
    parser.add_argument("--resolution", choices=("highres", "lowres"), default="lowres")
    parser.add_argument("--init-filters", type=int, default=32, help="network width (32: the real one)")
    parser.add_argument("--stable-age", type=int, default=2, help="Orthanc's StableAge, s (default %(default)s)")
    parser.add_argument("--poll-seconds", type=float, default=0.2)
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="seconds tritonserver may take to load its models (a loaded 2-core box: minutes)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the numbers here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="router-latency-") as work:
        result = measure(args, Path(work))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
