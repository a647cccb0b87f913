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
Each path's time on the Triton server (the growth of the ensembles' success time in its statistics) is read
around it, so that "wall less Triton" (reading, sending, writing, and for MONAI Label its own handling) can
be compared on a loaded machine whose compute time drifts; odd rounds run the paths in reverse order.
Prints a markdown table naming the machine (medians over rounds). Without -u, a local tritonserver (CPU configs) with the small test network (`init_filters=8`,
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
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from client.segmentation_client import SegmentationClient
from perf.cohort_benchmark import server_seconds
from perf.run import machine_info
from slicer.protocol import MODELS
from slicer.serve import MonaiLabelServer
from slicer.venv import REPO
from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.contract import ENSEMBLE, ENSEMBLE_INT16
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


def triton_seconds(url: str) -> float:
    """Seconds the server has spent on successful requests of both ensembles (float32 and int16 input)."""
    total = 0.0
    for model in (ENSEMBLE, ENSEMBLE_INT16):
        with contextlib.suppress(Exception):  # a server without the int16 twin
            total += server_seconds(url, model)
    return total


def one_round(ml: MonaiLabelServer, url: str, ct: Path, resolution: str, work: Path,
              n: int) -> dict[str, tuple[float, float]]:
    """(wall seconds, Triton seconds) of each row of ROWS for one round; checks that the label files are equal."""
    times: dict[str, tuple[float, float]] = {}
    out = work / f"round{n}"
    out.mkdir()
    model = next(m for m, r in MODELS.items() if r == resolution)

    def timed(row: str, run: Callable[[], float | None]) -> None:
        before, start = triton_seconds(url), time.perf_counter()
        seconds = run()
        times[row] = (seconds if seconds is not None else time.perf_counter() - start, triton_seconds(url) - before)

    def python_m_client() -> None:
        subprocess.run([sys.executable, "-m", "client", str(ct), "-o", str(out), "-u", url, "--resolution",
                        resolution, "-q"], cwd=REPO, check=True, capture_output=True)

    def in_process() -> None:
        with SegmentationClient(url) as seg:
            seg.segment_file(ct, out / "in_process.nii.gz", resolution=resolution)

    session_id: list[str] = []

    def upload() -> float:
        [session] = ml.calls([{"method": "create_session", "file": str(ct)}])
        if not session["ok"]:
            raise RuntimeError(f"PUT /session/: {session['error']}")
        session_id.append(session["result"]["session_id"])
        return float(session["seconds"])

    def infer() -> float:
        [done] = ml.calls([{"method": "infer", "model": model, "session_id": session_id[-1],
                            "out": str(out / "monailabel.nii.gz")}])
        if not done["ok"]:
            raise RuntimeError(f"POST /infer: {done['error']}")
        return float(done["seconds"])

    steps = [(ROWS[0], python_m_client), (ROWS[1], in_process), (ROWS[2], upload), (ROWS[3], infer)]
    if n % 2:
        steps = [steps[2], steps[3], steps[1], steps[0]]
    for row, run in steps:
        timed(row, run)
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
    samples: dict[str, list[tuple[float, float]]] = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory(prefix="slicer-overhead-") as tmp:
        work = Path(tmp)
        ct = work / "ct.nii.gz"
        nib.save(synthetic_ct(tuple(args.shape), (0.84, 0.84, 1.5), seed=0), ct)
        with triton(args.url, work) as (url, served), \
                MonaiLabelServer(work / "studies", work / "monailabel", url, token=secrets.token_urlsafe(16)) as ml:
            for n in range(args.rounds):
                for row, seconds in one_round(ml, url, ct, args.resolution, work, n).items():
                    samples[row].append(seconds)
                log.info("round %d: %s", n + 1, ", ".join(f"{v[-1][0]:.1f} s" for v in samples.values()))
    wall = {row: statistics.median(w for w, _ in values) for row, values in samples.items()}
    triton_s = {row: statistics.median(t for _, t in values) for row, values in samples.items()}
    rest = {row: statistics.median(w - t for w, t in values) for row, values in samples.items()}
    shape = "x".join(map(str, args.shape))
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores; {served}; CT {shape} int16 .nii.gz "
          f"({ct.name}, 0.84x0.84x1.5 mm), {args.resolution}; median of {args.rounds} rounds; "
          "the three label files equal in every round\n")
    print("| path | wall s | of which Triton s | wall less Triton s | wall s per round |")
    print("|---|---|---|---|---|")
    for row in ROWS:
        print(f"| {row} | {wall[row]:.1f} | {triton_s[row]:.1f} | {rest[row]:.1f} | "
              f"{', '.join(f'{w:.1f}' for w, _ in samples[row])} |")
    extra = rest[ROWS[3]] - rest[ROWS[1]]
    print(f"| **MONAI Label's own cost**: POST /infer less segment_file, outside Triton | | | **{extra:+.1f}** | |")
    slicer = rest[ROWS[2]] + rest[ROWS[3]] - rest[ROWS[0]]
    print(f"| Slicer (upload + infer) less python -m client, outside Triton | | | {slicer:+.1f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
