"""Time for a person to see a SEG in the OHIF viewer served by Orthanc, per DICOM-SEG encoding.

The CT and SEG of tests/test_viewer.py (example_ct_sm cropped to 120x96x30, TotalSegmentator's real masks of
38 structures, written by clinical.dicom_seg), stored into a fresh Orthanc serving the viewer
(viewer.orthanc_settings), then opened in headless Chromium (viewer.capture). Stages, seconds from the start
of Chromium: its debugging port open; the SEG drawn over the CT (OHIF asks "open this Segmentation?");
the segment list shown after Yes. Prints a markdown table naming the machine.

    python -m perf.viewer_load                                 # labelmap-rle and binary, one run each
    python -m perf.viewer_load --encodings labelmap-rle --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from clinical import structures as st
from clinical.dicom_seg import ENCODINGS, write_dicom_seg
from clinical.dicom_series import read_ct_series, write_ct_series
from clinical.dicomweb import store
from perf.run import machine_info
from tests.orthanc import local_orthanc
from viewer import ohif
from wholebody.sample_data import real_ct, real_label_map
from wholebody.triton_server.install import DEFAULT_CACHE

CROP = (slice(0, 120), slice(0, 96))  # tests/test_viewer.py's: BINARY frames of whole bytes
STAGES = ("orthanc", "store", "browser", "prompt", "panel")


def run_once(encoding: str, folder: Path, dist: Path) -> dict[str, float]:
    """One fresh Orthanc and Chromium: seconds of each of STAGES."""
    series = read_ct_series(folder / "ct")[0]
    labels = np.asanyarray(real_label_map(st.label_names()).dataobj)[CROP]
    seg = write_dicom_seg(labels, series.datasets, folder / f"{encoding}.dcm", encoding=encoding)
    times: dict[str, float] = {}
    start = time.perf_counter()
    with local_orthanc(extra_config=ohif.orthanc_settings(dist), start_timeout_s=120) as pacs:
        times["orthanc"] = time.perf_counter() - start
        start = time.perf_counter()
        store(pacs.dicomweb, sorted((folder / "ct").glob("*.dcm")) + [seg])
        times["store"] = time.perf_counter() - start
        seg_series = pydicom.dcmread(seg, stop_before_pixels=True).SeriesInstanceUID
        ohif.capture(ohif.study_url(pacs.url, series.study_uid, series_uid=seg_series),
                     folder / f"{encoding}.png", timings=times)
    return times


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m perf.viewer_load`."""
    parser = argparse.ArgumentParser(prog="python -m perf.viewer_load", description=__doc__.splitlines()[0])
    parser.add_argument("--encodings", default="labelmap-rle,binary",
                        help=f"comma-separated, of {', '.join(ENCODINGS)} (default labelmap-rle,binary)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per encoding (default 1); medians shown")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    encodings = args.encodings.split(",")
    unknown = set(encodings) - set(ENCODINGS)
    if unknown:
        parser.error(f"unknown encoding(s) {', '.join(sorted(unknown))}")
    dist = ohif.ensure_viewer(DEFAULT_CACHE)
    rows = []
    with tempfile.TemporaryDirectory(prefix="viewer-load-") as tmp:
        folder = Path(tmp)
        ct = nib.load(real_ct("example_ct_sm"))
        write_ct_series(np.asanyarray(ct.dataobj)[CROP], ct.affine, folder / "ct", patient_id="PERF")
        for encoding in encodings:
            runs = [run_once(encoding, folder, dist) for _ in range(args.repeats)]
            rows.append((encoding, {s: statistics.median(r[s] for r in runs) for s in STAGES}))
    info = machine_info()
    print(f"\nOHIF {ohif.pin()['version']} served by Orthanc (ServeFolders), headless Chromium; CT 120x96x30, "
          f"38 structures; {info['cpu']}, {info['cores']} cores; medians of {args.repeats} run(s), seconds\n")
    print("| encoding | Orthanc up | STOW 31 files | Chromium up | SEG drawn over the CT | segment list shown |")
    print("|---|---|---|---|---|---|")
    for encoding, t in rows:
        print(f"| `{encoding}` | " + " | ".join(f"{t[s]:.1f}" for s in STAGES) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
