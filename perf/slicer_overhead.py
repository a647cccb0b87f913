"""python -m perf.slicer_overhead: what 3D Slicer's path (MONAI Label's server, slicer/monailabel_app) costs on
top of the project's own client, for one CT on the same Triton server.

    python -m perf.slicer_overhead                           # 512x512x397 synthetic CT, lowres, 2 rounds
    python -m perf.slicer_overhead --shape 256 256 200 --rounds 3 --resolution highres
    python -m perf.slicer_overhead -u localhost:8001         # a running server (its own network and limits)

Rows, each round in this order on the same CT file (.nii.gz, int16, 0.84x0.84x1.5 mm):
- `python -m client CT` (a fresh interpreter: start, read, segment, write), wall time;
- `SegmentationClient.segment_file` in this process (read, segment, write), wall time;
- what Slicer's MONAI Label module does, with MONAILabelClient in MONAI Label's virtualenv: `PUT /session/`
  (upload the volume) and `POST /infer/wholebody_<resolution>?session_id=...` (the server reads the session's
  file, segments it through the ensemble with the same client library, writes the label file, and answers it
  in a multipart response that the client saves), each timed around the client's call.
The overhead row is POST /infer less `segment_file`. Prints a markdown table naming the machine (medians over
rounds). Without -u, a local tritonserver (CPU configs) with the small test network (`init_filters=8`,
random weights) is started on a free loopback port; either way the MONAI Label server is started here
(needs `make monailabel`) and everything is stopped at the end. Other work on the machine moves the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from client.segmentation_client import SegmentationClient
from perf.run import machine_info
from slicer.protocol import MODELS
from slicer.serve import MonaiLabelServer
from slicer.venv import REPO
from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.sample_data import synthetic_ct
from wholebody.triton_server import LocalTritonServer

log = logging.getLogger("perf.slicer_overhead")

ROWS = ("python -m client (fresh interpreter)", "SegmentationClient.segment_file (in process)",
        "Slicer: PUT /session/ (upload)", "Slicer: POST /infer (MONAI Label)")


@contextlib.contextmanager
def triton(url: str | None, work: Path) -> Iterator[tuple[str, str]]:
    """(gRPC url, what it serves): `url` as given, else a local server of the small test network."""
    if url:
        yield url, f"the server at {url}"
        return
    repo = copy_model_repository(work / "model_repository")
    install_bundle(make_test_bundle(work / "bundle", init_filters=8, seed=0), repo)
    with LocalTritonServer(model_repository=repo) as server:
        yield server.grpc_url, "a local tritonserver, CPU configs, small test network (init_filters=8, random weights)"


def one_round(ml: MonaiLabelServer, url: str, ct: Path, resolution: str, work: Path, n: int) -> dict[str, float]:
    """Seconds of each row of ROWS for one round; checks that the label files are equal."""
    times: dict[str, float] = {}
    out = work / f"round{n}"
    out.mkdir()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "client", str(ct), "-o", str(out), "-u", url, "--resolution", resolution,
                    "-q"], cwd=REPO, check=True, capture_output=True)
    times[ROWS[0]] = time.perf_counter() - start
    start = time.perf_counter()
    with SegmentationClient(url) as seg:
        seg.segment_file(ct, out / "in_process.nii.gz", resolution=resolution)
    times[ROWS[1]] = time.perf_counter() - start
    [session] = ml.calls([{"method": "create_session", "file": str(ct)}])
    if not session["ok"]:
        raise RuntimeError(f"PUT /session/: {session['error']}")
    model = next(m for m, r in MODELS.items() if r == resolution)
    [infer] = ml.calls([{"method": "infer", "model": model, "session_id": session["result"]["session_id"],
                         "out": str(out / "monailabel.nii.gz")}])
    if not infer["ok"]:
        raise RuntimeError(f"POST /infer: {infer['error']}")
    times[ROWS[2]], times[ROWS[3]] = session["seconds"], infer["seconds"]
    labels = [np.asanyarray(nib.load(p).dataobj) for p in (out / "ct_seg.nii.gz", out / "in_process.nii.gz",
                                                           out / "monailabel.nii.gz")]
    if not all(np.array_equal(labels[0], other) for other in labels[1:]):
        raise RuntimeError("the label files of the three paths differ")
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.slicer_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 397), metavar=("X", "Y", "Z"),
                        help="voxels of the synthetic CT (default 512 512 397, 0.84x0.84x1.5 mm)")
    parser.add_argument("--resolution", default="lowres", choices=sorted(MODELS.values()),
                        help="the ensemble's resolution = MONAI Label model wholebody_<resolution> (default lowres)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the table gives medians (default 2)")
    parser.add_argument("-u", "--url", default=None, help="a running Triton server (default: start a local one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = machine_info()
    samples: dict[str, list[float]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory(prefix="slicer-overhead-") as tmp:
        work = Path(tmp)
        ct = work / "ct.nii.gz"
        nib.save(synthetic_ct(tuple(args.shape), (0.84, 0.84, 1.5), seed=0), ct)
        with triton(args.url, work) as (url, served), \
                MonaiLabelServer(work / "studies", work / "monailabel", url, token=secrets.token_urlsafe(16)) as ml:
            for n in range(args.rounds):
                for row, seconds in one_round(ml, url, ct, args.resolution, work, n).items():
                    samples[row].append(seconds)
                log.info("round %d: %s", n + 1, ", ".join(f"{v[-1]:.1f} s" for v in samples.values()))
    median = {row: statistics.median(values) for row, values in samples.items()}
    shape = "x".join(map(str, args.shape))
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores; {served}; CT {shape} int16 .nii.gz "
          f"({ct.name}, 0.84x0.84x1.5 mm), {args.resolution}; median of {args.rounds} rounds; "
          "the three label files equal in every round\n")
    print("| path | seconds (median) | rounds |")
    print("|---|---|---|")
    for row in ROWS:
        print(f"| {row} | {median[row]:.1f} | {', '.join(f'{v:.1f}' for v in samples[row])} |")
    overhead = median[ROWS[3]] - median[ROWS[1]]
    print(f"| POST /infer less segment_file (MONAI Label's overhead) | {overhead:+.1f} "
          f"({overhead / median[ROWS[1]]:+.0%}) | |")
    print(f"| Slicer total (upload + infer) less python -m client | {median[ROWS[2]] + median[ROWS[3]] - median[ROWS[0]]:+.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
