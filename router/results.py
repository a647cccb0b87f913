"""THE HOOK where a series' results are made: `results_for` turns one segmented series into the DICOM files
the router stores in Orthanc and forwards to the PACS.

It writes the DICOM-SEG (clinical.dicom_seg.write_dicom_seg), runs the quality checks on the result
(clinical.quality.check_scan under the site's policy) and writes the TID 1500 Structured Report that
references the SEG (clinical.structured_report). When the policy holds the result back, `hold` is a one-line
reason: the router then stores the files in Orthanc for review, does not forward them to the PACS, and
records the series as ``held``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import pydicom

from clinical.dicom_seg import write_dicom_seg
from clinical.dicom_series import DicomSeries
from clinical.quality import QualityPolicy, QualityReport, check_scan
from clinical.statistics import structure_statistics
from clinical.structured_report import make_measurement_report, write_measurement_report
from clinical.structures import label_names

# BINARY, not clinical.seg_encodings' LABELMAP default: Orthanc 1.10 (Debian 12, DCMTK 3.6.7) cannot C-STORE
# the 2024 Label Map Segmentation SOP class ("Cannot transcode from 1.2.840.10008.1.2.5 to one of [ ]",
# measured), and PACS of that age do not accept it either; every SEG reader the project tests opens BINARY.
ROUTER_ENCODING = "binary"
# what the router's SEG says of itself: a PACS user sees it as the series description
SEG_SERIES_DESCRIPTION = "wholeBody_ct_segmentation (auto)"


@dataclass
class Results:
    """What `results_for` made: DICOM files to store (SEG first, then the SR), a reason to hold them back (or
    None), and the quality report (None when the checks were turned off)."""

    files: list[Path]
    hold: str | None = None
    quality: QualityReport | None = None
    stages: dict[str, float] = field(default_factory=dict)  # stage -> seconds, merged into the series' record


def hold_reason(report: QualityReport) -> str | None:
    """One line naming the failed checks whose action is "hold" (and a few structures), or None."""
    held = [c for c in report.failures() if report.policy.get(c.check) == "hold"]
    if not held:
        return None
    parts = sorted({c.check + (f" ({c.structure})" if c.structure else "") for c in held})
    more = f" and {len(parts) - 5} more" if len(parts) > 5 else ""
    return "quality checks hold it: " + ", ".join(parts[:5]) + more


def results_for(series: DicomSeries, label_map: np.ndarray, folder: Path, *, encoding: str = ROUTER_ENCODING,
                uid_seed: str | None = None, quality_policy: QualityPolicy | None = None,
                quality_checks: bool = True, structured_report: bool = True) -> Results:
    """The result files of one segmented series, written into `folder`.

    series: the CT as read from Orthanc (clinical.dicom_series: volume [X, Y, Z] HU, headers in Z order).
    label_map: [X, Y, Z] uint8 bundle labels on the series' grid (SegmentationClient.segment).
    uid_seed: derives the SEG's and the SR's Series/SOP Instance UIDs (the router passes the source series
    UID and the model's version), so a series made again after a crash gives the same UIDs and is stored once.
    quality_policy: the site's action per check (None: clinical.quality.DEFAULT_ACTIONS); quality_checks
    False: no checks, no hold, and the SR carries measurements only. structured_report False: no SR.
    Raises clinical.dicom_seg.DicomSegError (an empty label map, a source without UIDs): permanent.
    """
    started = time.monotonic()
    seg_path = write_dicom_seg(label_map, series.datasets, folder / "seg.dcm", encoding=encoding,
                               series_description=SEG_SERIES_DESCRIPTION, uid_seed=uid_seed)
    stages = {"seg_encode_s": time.monotonic() - started}
    files = [seg_path]
    if not (quality_checks or structured_report):
        return Results(files=files, stages=stages)
    started = time.monotonic()
    names = label_names()
    statistics = structure_statistics(label_map, series.volume, series.affine, names)
    report = (check_scan(label_map, series.volume, series.affine, names, quality_policy, statistics=statistics)
              if quality_checks else None)
    stages["quality_s"] = time.monotonic() - started
    if structured_report:
        started = time.monotonic()
        seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
        sr = make_measurement_report(seg, series.datasets, label_map, series.volume, series.affine, report,
                                     statistics=statistics, uid_seed=uid_seed)
        files.append(write_measurement_report(sr, folder / "sr.dcm"))
        stages["sr_s"] = time.monotonic() - started
    return Results(files=files, hold=None if report is None else hold_reason(report), quality=report,
                   stages=stages)
