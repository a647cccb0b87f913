"""clinical.rtstruct: an RT Structure Set of a constructed label map on a synthetic CT series, checked by
dciodvfy and read back by a reader written here from the standard (pydicom for the file, scikit-image's
`draw.polygon` to fill each contour, even-odd for holes), not by the writer's code; orientation on
structures placed left/anterior/superior; and `python -m client --rtstruct --store-seg` against the real
tritonserver and a real Orthanc."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from pydicom.dataset import Dataset
from skimage.draw import polygon

from client.__main__ import main as client_main
from client.cohort import MANIFEST_NAME, read_manifest
from clinical import structures as st
from clinical.dicom_series import DicomSeries, read_ct_series, write_ct_series
from clinical.dicomweb import find_series
from clinical.rtstruct import CONTOURS, RtStructError, write_rtstruct
from tests import seg_readers as readers
from tests.orthanc import local_orthanc
from wholebody.sample_data import real_ct
from wholebody.triton_server import LocalTritonServer

LABEL = {name: i for i, name in enumerate(st.label_names())}
STUDY = "1.2.826.0.1.3680043.8.498.71"
# RAS affines of the synthetic series: non-square pixels, X running to the patient's left and slices running
# down (so LPS and the array disagree on every axis' sign but Y); the second with a 15 degree gantry tilt
# (each slice shifted along Y: one matrix for the whole series would misplace it)
TILT = np.tan(np.radians(15.0)) * 2.5
AFFINES = {
    "flipped": np.array([[-0.9, 0, 0, 40.0], [0, 1.3, 0, -20.0], [0, 0, -2.5, 100.0], [0, 0, 0, 1]]),
    "tilted": np.array([[0.9, 0, 0, -40.0], [0, 1.3, 0, -20.0], [0, 0, 2.5, -10.0], [0, 0, 0, 1]])
    + np.array([[0, 0, 0, 0], [0, 0, TILT, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
}


def synthetic_series(folder: Path, affine: np.ndarray, shape: tuple[int, int, int] = (40, 32, 12)) -> DicomSeries:
    write_ct_series(np.full(shape, -1000, dtype=np.int16), affine, folder, study_uid=STUDY, patient_id="RT1")
    (series,) = read_ct_series(folder)
    return series


def ras_of(affine: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Voxel indices [N, 3] -> RAS mm [N, 3]."""
    return index @ affine[:3, :3].T + affine[:3, 3]


def constructed_labels(series: DicomSeries) -> np.ndarray:
    """kidney_left in the corner of the grid nearest the patient's left, anterior and superior; liver in the
    opposite corner; the aorta a ring (a hole on every slice); the spleen touching the image's edge."""
    shape = series.volume.shape
    labels = np.zeros(shape, dtype=np.uint8)
    corners = np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    lps = ras_of(series.affine, corners) * [-1, -1, 1]
    # left: +x in LPS, anterior: -y, superior: +z
    las = corners[np.argmax(lps[:, 0] - lps[:, 1] + lps[:, 2])]
    block = [slice(1, 5) if c == 0 else slice(c - 4, c) for c in las]
    labels[tuple(block)] = LABEL["kidney_left"]
    opposite = [slice(1, 5) if c != 0 else slice(n - 5, n - 1) for c, n in zip(las, shape)]
    labels[tuple(opposite)] = LABEL["liver"]
    mid = [n // 2 for n in shape]
    labels[mid[0] - 5:mid[0] + 5, mid[1] - 4:mid[1] + 4, 3:9] = LABEL["aorta"]
    labels[mid[0] - 2:mid[0] + 2, mid[1] - 1:mid[1] + 1, 3:9] = 0
    labels[0:4, mid[1]:mid[1] + 5, 4:8] = LABEL["spleen"]
    return labels


def read_rtstruct(path: Path, source: list[Dataset]) -> tuple[Dataset, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The RTSTRUCT, and per ROI name its mask [X, Y, Z] bool on the source grid and its contour points (LPS mm).

    Each contour's points go to (row, column) of the slice it references through that slice's
    ImagePositionPatient, ImageOrientationPatient and PixelSpacing (PS3.3 C.7.6.2.1.1), must lie on its plane,
    and are filled with skimage.draw.polygon; contours of one slice combine by even-odd (XOR)."""
    ds = pydicom.dcmread(path)
    z_of = {str(s.SOPInstanceUID): z for z, s in enumerate(source)}
    names = {int(roi.ROINumber): str(roi.ROIName) for roi in ds.StructureSetROISequence}
    rows, columns = int(source[0].Rows), int(source[0].Columns)
    masks, points = {}, {}
    for roi in ds.ROIContourSequence:
        mask = np.zeros((columns, rows, len(source)), dtype=bool)
        everything = []
        for contour in roi.ContourSequence:
            assert contour.ContourGeometricType == "CLOSED_PLANAR"
            z = z_of[str(contour.ContourImageSequence[0].ReferencedSOPInstanceUID)]
            image = source[z]
            xyz = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            assert len(xyz) == int(contour.NumberOfContourPoints)
            iop = np.asarray(image.ImageOrientationPatient, dtype=np.float64)
            offset = xyz - np.asarray(image.ImagePositionPatient, dtype=np.float64)
            assert np.abs(offset @ np.cross(iop[:3], iop[3:])).max() < 0.01  # on the slice's plane
            row_spacing, column_spacing = (float(v) for v in image.PixelSpacing)
            r, c = polygon(offset @ iop[3:] / row_spacing, offset @ iop[:3] / column_spacing, shape=(rows, columns))
            filled = np.zeros((rows, columns), dtype=bool)
            filled[r, c] = True
            mask[:, :, z] ^= filled.T
            everything.append(xyz)
        name = names[int(roi.ReferencedROINumber)]
        masks[name], points[name] = mask, np.concatenate(everything)
    return ds, masks, points


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("geometry", sorted(AFFINES))
def test_rtstruct_conforms_reads_back_and_keeps_orientation(tmp_path: Path, geometry: str) -> None:
    series = synthetic_series(tmp_path / "ct", AFFINES[geometry])
    assert series.sheared == (geometry == "tilted")
    labels = constructed_labels(series)
    path = write_rtstruct(labels, series.datasets, tmp_path / "rt.dcm")

    assert readers.dciodvfy_lines(path, ("Error", "Warning")) == []
    ds, masks, points = read_rtstruct(path, series.datasets)
    first = series.datasets[0]
    assert ds.SOPClassUID == pydicom.uid.RTStructureSetStorage and ds.Modality == "RTSTRUCT"
    assert ds.StudyInstanceUID == STUDY and ds.PatientID == "RT1" and ds.ApprovalStatus == "UNAPPROVED"
    (frame,) = ds.ReferencedFrameOfReferenceSequence
    assert frame.FrameOfReferenceUID == first.FrameOfReferenceUID
    (referenced,) = frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == series.series_uid
    assert [i.ReferencedSOPInstanceUID for i in referenced.ContourImageSequence] == [
        s.SOPInstanceUID for s in series.datasets]
    present = [int(v) for v in np.unique(labels) if v]
    assert [roi.ROIName for roi in ds.StructureSetROISequence] == [st.label_names()[v] for v in present]
    assert all(roi.ReferencedFrameOfReferenceUID == first.FrameOfReferenceUID for roi in ds.StructureSetROISequence)
    colours = {r.ReferencedROINumber: tuple(r.ROIDisplayColor) for r in ds.ROIContourSequence}
    for roi in ds.StructureSetROISequence:
        assert colours[roi.ROINumber] == st.by_name(roi.ROIName).color
    # each ROI coded as its SEG segment: SNOMED CT type (+ laterality) and category from structures.json
    names = {roi.ROINumber: roi.ROIName for roi in ds.StructureSetROISequence}
    for observation in ds.RTROIObservationsSequence:
        structure = st.by_name(names[observation.ReferencedROINumber])
        (code,) = observation.RTROIIdentificationCodeSequence
        assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
            structure.type.value, structure.type.scheme, structure.type.meaning)
        modifiers = [(m.CodeValue, m.CodeMeaning) for m in code.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == ([] if structure.modifier is None else [(structure.modifier.value,
                                                                    structure.modifier.meaning)])
        (category,) = observation.SegmentedPropertyCategoryCodeSequence
        assert category.CodeValue == structure.category.value
    assert names[next(o.ReferencedROINumber for o in ds.RTROIObservationsSequence
                      if o.RTROIIdentificationCodeSequence[0].get("SegmentedPropertyTypeModifierCodeSequence"))] == \
        "kidney_left"
    for value in present:  # outlines half-way between pixel centres: every voxel comes back, no other
        name = st.label_names()[value]
        assert dice(masks[name], labels == value) >= 0.9, name
        assert np.array_equal(masks[name], labels == value), name
    # the ring keeps its hole; the edge-touching spleen is whole
    assert not masks["aorta"][labels.shape[0] // 2, labels.shape[1] // 2, 5]

    # orientation: the left/anterior/superior structure is there in patient LPS, where the NIfTI affine puts it
    left, liver = points["kidney_left"].mean(axis=0), points["liver"].mean(axis=0)
    assert left[0] > liver[0] and left[1] < liver[1] and left[2] > liver[2]
    for name in ("kidney_left", "liver"):
        expected = ras_of(series.affine, np.argwhere(labels == LABEL[name]).astype(float)).mean(axis=0) * [-1, -1, 1]
        spacing = np.linalg.norm(series.affine[:3, :3], axis=0).max()
        assert np.abs(points[name].mean(axis=0) - expected).max() < spacing, name


def test_rtstruct_refusals_are_one_line_and_leave_nothing(tmp_path: Path) -> None:
    series = synthetic_series(tmp_path / "ct", AFFINES["flipped"], shape=(12, 10, 3))
    path = tmp_path / "rt.dcm"
    with pytest.raises(RtStructError, match="empty") as empty:
        write_rtstruct(np.zeros(series.volume.shape, np.uint8), series.datasets, path)
    anonymised = [copy.deepcopy(ds) for ds in series.datasets]
    for ds in anonymised:
        del ds.FrameOfReferenceUID
    labels = np.zeros(series.volume.shape, np.uint8)
    labels[2:5, 2:5, 1] = LABEL["liver"]
    with pytest.raises(RtStructError, match="lacks FrameOfReferenceUID") as no_uid:
        write_rtstruct(labels, anonymised, path)
    with pytest.raises(RtStructError, match="not on the source series' grid") as grid:
        write_rtstruct(labels[:, :, :2], series.datasets, path)
    wide = labels.astype(np.int16)
    wide[6, 6, 1] = 300  # would wrap to 44 (an ROI under another structure's name) in a cast to uint8
    with pytest.raises(RtStructError, match=r"label values 0\.\.300 outside 0\.\.255") as wrapped:
        write_rtstruct(wide, series.datasets, path)
    for exc in (empty, no_uid, grid, wrapped):
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)
    assert os.listdir(tmp_path) == ["ct"]
    # with a seed, the same UIDs again (a PACS stores a rewritten RTSTRUCT once)
    a = pydicom.dcmread(write_rtstruct(labels, series.datasets, tmp_path / "a.dcm", uid_seed="s"))
    b = pydicom.dcmread(write_rtstruct(labels, series.datasets, tmp_path / "b.dcm", uid_seed="s"))
    assert (a.SOPInstanceUID, a.SeriesInstanceUID) == (b.SOPInstanceUID, b.SeriesInstanceUID)


def test_client_refuses_rtstruct_for_nifti(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), ct)
    assert client_main([str(ct), "-o", str(tmp_path / "out"), "--rtstruct", "-u", "127.0.0.1:1"]) == 2
    assert "--rtstruct needs DICOM inputs" in caplog.text  # before any request
    assert not (tmp_path / "out" / "ct_rtstruct.dcm").exists()


def test_client_rtstruct_end_to_end(server: LocalTritonServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 slices of the real abdomen CT pulled from a real Orthanc: `--rtstruct --store-seg` writes the RTSTRUCT
    beside the label map, equal to it in a reader of our own (Dice >= 0.9 per structure of >= 50 voxels), and
    stores it in the study; a rerun of the same command skips the scan (the recipe is unchanged)."""
    img = nib.load(real_ct("example_ct"))
    study = tmp_path / "study"
    write_ct_series(np.asanyarray(img.dataobj)[:, :, 40:56], img.affine, study / "s1", study_uid=STUDY,
                    patient_id="RT1")
    (series,) = read_ct_series(study / "s1")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the pulled study goes
    with local_orthanc() as orthanc:
        for f in sorted((study / "s1").iterdir()):  # uploaded with Orthanc's own REST API
            requests.post(f"{orthanc.url}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
        command = ["--dicomweb", orthanc.dicomweb, "--study", STUDY, "--store-seg", "--rtstruct",
                   "--output-type", "nifti", "-u", server.grpc_url, "--resolution", "lowres", "-q",
                   "-o", str(tmp_path / "out")]
        assert client_main(command) == 0
        base = tmp_path / "out" / STUDY / series.series_uid / "series1"
        rtstruct = Path(f"{base}_rtstruct.dcm")
        labels = np.asarray(nib.load(f"{base}_seg.nii.gz").dataobj)
        assert labels.shape == series.volume.shape
        ds, masks, _ = read_rtstruct(rtstruct, series.datasets)
        present = [int(v) for v in np.unique(labels) if v]
        assert present and sorted(masks) == sorted(st.label_names()[v] for v in present)
        for value in present:
            if (labels == value).sum() >= 50:
                assert dice(masks[st.label_names()[value]], labels == value) >= 0.9, st.label_names()[value]
        (stored,) = find_series(orthanc.dicomweb, STUDY, modality="RTSTRUCT")
        assert stored == ds.SeriesInstanceUID
        (record,) = read_manifest(tmp_path / "out" / MANIFEST_NAME)
        assert record["recipe"]["rtstruct_contours"] == CONTOURS
        assert str(rtstruct) in record["outputs"]

        made = rtstruct.stat().st_mtime_ns
        assert client_main(command) == 0
        assert read_manifest(tmp_path / "out" / MANIFEST_NAME)[-1]["status"] == "skipped"
        assert rtstruct.stat().st_mtime_ns == made
        assert len(find_series(orthanc.dicomweb, STUDY, modality="RTSTRUCT")) == 1
    assert not list(scratch.iterdir())
