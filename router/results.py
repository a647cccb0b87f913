"""THE HOOK where a series' results are made: `results_for` turns one segmented series into the DICOM files
the router stores in Orthanc and forwards to the PACS.

Today it writes the DICOM-SEG (clinical.dicom_seg.write_dicom_seg). Quality checks and the TID 1500
Structured Report (issue 18 items 2 and 3) are added here: append the SR's path to `files`, and set
`hold` to a one-line reason when the site's QC policy holds a result back (the router then stores the
files in Orthanc for review, does not forward them, and records the series as ``held``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clinical.dicom_seg import write_dicom_seg
from clinical.dicom_series import DicomSeries

# BINARY, not clinical.seg_encodings' LABELMAP default: Orthanc 1.10 (Debian 12, DCMTK 3.6.7) cannot C-STORE
# the 2024 Label Map Segmentation SOP class ("Cannot transcode from 1.2.840.10008.1.2.5 to one of [ ]",
# measured), and PACS of that age do not accept it either; every SEG reader the project tests opens BINARY.
ROUTER_ENCODING = "binary"
# what the router's SEG says of itself: a PACS user sees it as the series description
SEG_SERIES_DESCRIPTION = "wholeBody_ct_segmentation (auto)"


@dataclass
class Results:
    """What `results_for` made: DICOM files to store (SEG first), and a reason to hold them back (or None)."""

    files: list[Path]
    hold: str | None = None
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds, merged into the series' record


def results_for(series: DicomSeries, label_map: np.ndarray, folder: Path, *, encoding: str = ROUTER_ENCODING,
                uid_seed: str | None = None) -> Results:
    """The result files of one segmented series, written into `folder`.

    series: the CT as read from Orthanc (clinical.dicom_series: volume [X, Y, Z], headers in Z order).
    label_map: [X, Y, Z] uint8 bundle labels on the series' grid (SegmentationClient.segment).
    uid_seed: derives the SEG's Series/SOP Instance UIDs (the router passes the source series UID and
    the model's version), so a series made again after a crash gives the same UIDs and is stored once.
    Raises clinical.dicom_seg.DicomSegError (an empty label map, a source without UIDs): permanent.
    """
    started = time.monotonic()
    seg = write_dicom_seg(label_map, series.datasets, folder / "seg.dcm", encoding=encoding,
                          series_description=SEG_SERIES_DESCRIPTION, uid_seed=uid_seed)
    # QC (clinical.quality.check_scan) and the SR (clinical.structured_report.make_measurement_report)
    # are added here at merge: their files appended after the SEG, `hold` set by the site's QC policy.
    return Results(files=[seg], stages={"seg_encode_s": time.monotonic() - started})
