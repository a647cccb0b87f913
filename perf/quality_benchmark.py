"""Time of the quality checks and of the TID 1500 SR for one result of clinical size, one run.

A 512x512x397 label map (0.84 x 0.84 x 1.5 mm) with ~100 box-shaped structures (perf.dicom_seg_benchmark's
`blocky_label_map`, seeded) on a synthetic CT (a body of 40 HU with noise in air of -1000 HU, int16),
and CT headers without pixels (`clinical.dicom_series.ct_series_headers`). Timed: the statistics
(`clinical.statistics.structure_statistics`, shared by the checks and the SR), `clinical.quality.check_scan`
given those statistics, and `clinical.structured_report.make_measurement_report` + writing it; the
DICOM-SEG it references (labelmap-rle) for scale. Prints a markdown table naming the machine.

    python -m perf.quality_benchmark                     # ~1-2 min on 2 cores
    python -m perf.quality_benchmark --shape 256 256 200 --structures 50
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom

from clinical import structures as st
from clinical.dicom_seg import write_dicom_seg
from clinical.dicom_series import ct_series_headers
from clinical.quality import check_scan
from clinical.statistics import structure_statistics
from clinical.structured_report import make_measurement_report, write_measurement_report
from perf.dicom_seg_benchmark import blocky_label_map
from perf.run import machine_info


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """[X, Y, Z] int16 HU: an elliptic body of 40 +- 20 HU in air of -1000 HU."""
    nx, ny, _ = shape
    x, y = np.ogrid[:nx, :ny]
    body = ((x - nx / 2) / (0.45 * nx)) ** 2 + ((y - ny / 2) / (0.4 * ny)) ** 2 <= 1
    noise = np.random.default_rng(seed).normal(0, 20, shape).astype(np.float32)
    return (np.where(body[:, :, None], 40, -1000) + noise).astype(np.int16)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.quality_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 397), metavar=("X", "Y", "Z"))
    parser.add_argument("--structures", type=int, default=100, help="number of structures (default %(default)s)")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    affine = np.diag([0.84, 0.84, 1.5, 1.0])
    label_map = blocky_label_map(shape, args.structures)
    ct = synthetic_ct(shape)
    headers = ct_series_headers(shape, affine)
    names = st.label_names()
    info = machine_info()
    load = os.getloadavg()[0]
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        seg_path = write_dicom_seg(label_map, headers, Path(tmp) / "seg.dcm")
        rows.append(("DICOM-SEG written (labelmap-rle), for scale", time.perf_counter() - start))
        seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
        start = time.perf_counter()
        stats = structure_statistics(label_map, ct, affine, names)
        rows.append(("statistics (structure_statistics)", time.perf_counter() - start))
        start = time.perf_counter()
        report = check_scan(label_map, ct, affine, names, statistics=stats)
        rows.append(("quality checks (check_scan, statistics given)", time.perf_counter() - start))
        start = time.perf_counter()
        sr = make_measurement_report(seg, headers, label_map, ct, affine, report, statistics=stats)
        write_measurement_report(sr, Path(tmp) / "sr.dcm")
        rows.append(("SR made and written", time.perf_counter() - start))
        sr_bytes = (Path(tmp) / "sr.dcm").stat().st_size
    print(f"Machine: {info['cpu']}, {info['cores']} cores, load average {load:.1f} at the start; "
          f"{shape[0]}x{shape[1]}x{shape[2]} label map, {len(stats)} structures, SR {sr_bytes / 1e6:.2f} MB; "
          f"{len(report.failures())} checks failed")
    print()
    print("| step | seconds |")
    print("|---|---|")
    for step, seconds in rows:
        print(f"| {step} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
