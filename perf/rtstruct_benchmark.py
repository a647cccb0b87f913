"""Time and size of the RTSTRUCT (`clinical.rtstruct.write_rtstruct`) of one result of clinical size, one run.

A label map (default 512x512x397, 0.84 x 0.84 x 1.5 mm) of seeded ellipsoids (labels 1..--structures, 20-80 mm
across, later ones overwriting earlier ones), whose curved outlines give contours with as many points as
organs do (boxes would give four), on CT headers without pixels (`clinical.dicom_series.ct_series_headers`).
Prints a markdown table naming the machine.

    python -m perf.rtstruct_benchmark                      # ~1 min on 2 cores
    python -m perf.rtstruct_benchmark --shape 256 256 200 --structures 30
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

from clinical.dicom_series import ct_series_headers
from clinical.rtstruct import CONTOURS, write_rtstruct
from perf.run import machine_info

SPACING = (0.84, 0.84, 1.5)  # mm, a typical abdominal CT


def ellipsoid_label_map(shape: tuple[int, int, int], structures: int, seed: int = 0) -> np.ndarray:
    """[X, Y, Z] uint8: `structures` ellipsoids with semi-axes of 10-40 mm at seeded centres."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, dtype=np.uint8)
    for label in range(1, structures + 1):
        radii = rng.uniform(10, 40, 3) / SPACING  # voxels
        centre = rng.uniform(0.15, 0.85, 3) * shape
        lo = np.maximum((centre - radii).astype(int), 0)
        hi = np.minimum((centre + radii).astype(int) + 1, shape)
        x, y, z = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inside = ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 \
            + ((z - centre[2]) / radii[2]) ** 2 <= 1
        labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][inside] = label
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.rtstruct_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 397), metavar=("X", "Y", "Z"))
    parser.add_argument("--structures", type=int, default=100, help="number of structures (default %(default)s)")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    label_map = ellipsoid_label_map(shape, args.structures)
    headers = ct_series_headers(shape, np.diag([*SPACING, 1.0]))
    info = machine_info()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rtstruct.dcm"
        start = time.perf_counter()
        write_rtstruct(label_map, headers, path)
        seconds = time.perf_counter() - start
        size = path.stat().st_size
        start = time.perf_counter()
        ds = pydicom.dcmread(path)
        values = sum(len(c.ContourData) for roi in ds.ROIContourSequence for c in roi.ContourSequence)
        read_s = time.perf_counter() - start
    contours = sum(len(roi.ContourSequence) for roi in ds.ROIContourSequence)
    points = sum(int(c.NumberOfContourPoints) for roi in ds.ROIContourSequence for c in roi.ContourSequence)
    assert values == 3 * points
    print(f"Machine: {info['cpu']}, {info['cores']} cores, load average {load:.1f} at the start; "
          f"{shape[0]}x{shape[1]}x{shape[2]} label map, {len(ds.StructureSetROISequence)} structures, "
          f"contours {CONTOURS}")
    print()
    print("| RTSTRUCT | value |")
    print("|---|---|")
    print(f"| written (write_rtstruct), s | {seconds:.2f} |")
    print(f"| read back, every point (pydicom), s | {read_s:.2f} |")
    print(f"| size, MB | {size / 1e6:.2f} |")
    print(f"| contours | {contours} |")
    print(f"| points | {points} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
