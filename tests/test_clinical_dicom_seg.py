"""clinical.dicom_seg: a label map -> DICOM-SEG referencing its CT series -> highdicom -> the same labels and codes."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from clinical import structures as st
from clinical.dicom_seg import ALGORITHM_NAME, ENCODINGS, DicomSegError, read_dicom_seg, write_dicom_seg
from clinical.dicom_series import DicomSeries, read_ct_series, write_ct_series
from wholebody.sample_data import real_ct


def blocky_labels(shape: tuple[int, int, int], labels: np.ndarray, block: int = 8, seed: int = 0) -> np.ndarray:
    """A stand-in label map: blocks of `block` voxels, each one of `labels` (0 = background) at random."""
    rng = np.random.default_rng(seed)
    grid = rng.choice(labels, size=tuple(-(-n // block) for n in shape)).astype(np.uint8)
    return np.kron(grid, np.ones((block,) * 3, np.uint8))[: shape[0], : shape[1], : shape[2]]


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> DicomSeries:
    img = nib.load(real_ct("example_ct"))
    folder = tmp_path_factory.mktemp("ct")
    write_ct_series(np.asanyarray(img.dataobj)[:, :, 40:80], img.affine, folder, patient_id="P1")
    return read_ct_series(folder)[0]


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_round_trip_keeps_labels_names_and_codes(series: DicomSeries, tmp_path: Path, encoding: str) -> None:
    # every structure for the label-map encodings; a dozen for BINARY (one 1-bit frame per slice and segment)
    labels = np.arange(105) if encoding.startswith("labelmap") else np.array([0, 1, 2, 3, 5, 13, 18, 58, 90, 104])
    label_map = blocky_labels(series.volume.shape, labels)
    path = write_dicom_seg(label_map, series.datasets, tmp_path / "seg.dcm", encoding=encoding)
    back, segments = read_dicom_seg(path, series.datasets)
    np.testing.assert_array_equal(back, label_map)
    present = [int(v) for v in np.unique(label_map) if v]
    assert [s.label for s in segments] == present
    for s in segments:
        structure = st.structures()[s.label]
        assert (s.name, s.category, s.type, s.modifier) == (
            structure.name, structure.category, structure.type, structure.modifier)
    # what a PACS or viewer sees: the study, the series referenced, colours, the algorithm, the SOP class
    seg = hd.seg.segread(path)
    ds = pydicom.dcmread(path)
    assert ds.StudyInstanceUID == series.study_uid and ds.PatientID == "P1" and ds.Modality == "SEG"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    referenced = {item.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {d.SOPInstanceUID for d in series.datasets}
    assert ds.file_meta.TransferSyntaxUID == ENCODINGS[encoding][1]
    assert ds.SOPClassUID == ("1.2.840.10008.5.1.4.1.1.66.7" if encoding.startswith("labelmap")
                              else "1.2.840.10008.5.1.4.1.1.66.4")
    first = seg.get_segment_description(seg.segment_numbers[0])
    assert first.algorithm_identification[0].AlgorithmName == ALGORITHM_NAME
    rgb = st.structures()[segments[0].label].color
    assert list(first.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*rgb).value)


@pytest.mark.parametrize("encoding", ["labelmap-rle", "binary"])
def test_gantry_tilted_series(tmp_path: Path, encoding: str) -> None:
    img = nib.load(real_ct("example_ct"))
    affine = img.affine.copy()
    affine[1, 2] = 3.0 * np.tan(np.radians(15))  # sheared: slices step along y as well as z
    write_ct_series(np.asanyarray(img.dataobj)[:, :, :20], affine, tmp_path / "ct", gantry_tilt_deg=15)
    tilted, = read_ct_series(tmp_path / "ct")
    label_map = blocky_labels(tilted.volume.shape, np.array([0, 7, 58, 104]))
    path = write_dicom_seg(label_map, tilted.datasets, tmp_path / "seg.dcm", encoding=encoding)
    back, segments = read_dicom_seg(path, tilted.datasets)
    np.testing.assert_array_equal(back, label_map)
    assert [s.name for s in segments] == ["aorta", "rib_left_1", "urinary_bladder"]


def test_bad_inputs_get_one_line_errors(series: DicomSeries, tmp_path: Path) -> None:
    label_map = blocky_labels(series.volume.shape, np.array([0, 5]))
    with pytest.raises(DicomSegError, match="not on the source series' grid"):
        write_dicom_seg(label_map[:, :, :-1], series.datasets, tmp_path / "seg.dcm")
    with pytest.raises(DicomSegError, match="empty"):
        write_dicom_seg(np.zeros_like(label_map), series.datasets, tmp_path / "seg.dcm")
    with pytest.raises(ValueError, match="unknown DICOM-SEG encoding"):
        write_dicom_seg(label_map, series.datasets, tmp_path / "seg.dcm", encoding="png")
    anonymised = [pydicom.Dataset(d) for d in series.datasets]
    for d in anonymised:
        d.StudyInstanceUID = ""
    with pytest.raises(DicomSegError, match="lacks StudyInstanceUID"):
        write_dicom_seg(label_map, anonymised, tmp_path / "seg.dcm")
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "not.dcm").write_bytes(b"nothing")
    with pytest.raises(DicomSegError, match="not a readable DICOM-SEG"):
        read_dicom_seg(tmp_path / "not.dcm", series.datasets)


def test_benchmark_script_runs_on_a_small_label_map(capsys: pytest.CaptureFixture[str]) -> None:
    from perf import dicom_seg_benchmark

    assert dicom_seg_benchmark.main(["--shape", "48", "40", "24", "--structures", "12",
                                     "--encodings", "labelmap-rle,binary"]) == 0
    table = capsys.readouterr().out
    assert "| NIfTI .nii.gz (nibabel) |" in table and "| DICOM-SEG binary (BINARY" in table
