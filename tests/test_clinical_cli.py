"""The cohort client's clinical formats against the real tritonserver (CPU, small test network): DICOM
series in (one scan per series, --series-uid, a bad series reported in one line), NIfTI / DICOM-SEG /
seg.nrrd / statistics / preview out and read back, --roi-subset, resume over all outputs, up-front
refusals, and the PACS round trip through a real Orthanc (pull, segment, STOW the SEG, read it back).

Every comparison is with the NIfTI route for the same voxels and affine: labels must be equal (100 %).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests

from client.__main__ import main as client_main
from client.cohort import MANIFEST_NAME, read_manifest
from client.inputs import ScanError, discover
from client.outputs import make_writers, plan_outputs
from clinical import structures
from clinical.dicom_seg import read_dicom_seg
from clinical.dicom_series import read_ct_series, write_ct_series
from clinical.dicomweb import find_series, pull_series
from clinical.seg_encodings import LABEL_MAP_SEGMENTATION_STORAGE, SEGMENTATION_STORAGE
from clinical.seg_nrrd import read_seg_nrrd, terminology_entry
from clinical.statistics import structure_statistics
from tests.orthanc import local_orthanc
from wholebody.sample_data import real_ct, real_ct_dicom
from wholebody.triton_server import LocalTritonServer
from wholebody.health import answered_requests

STUDY = "1.2.826.0.1.3680043.8.498.10"


def crop(z0: int, z1: int) -> nib.Nifti1Image:
    """A slab of the real example CT (122x101 at 3 mm), int16 HU, with its own affine."""
    image = nib.load(real_ct("example_ct")).slicer[:, :, z0:z1]
    return nib.Nifti1Image(np.asanyarray(image.dataobj).astype(np.int16), image.affine)


def as_series(image: nib.Nifti1Image, folder: Path, series_uid: str, number: int) -> list[Path]:
    files = write_ct_series(np.asanyarray(image.dataobj), image.affine, folder, study_uid=STUDY,
                            series_uid=series_uid, patient_id="P10")
    for f in files:  # distinct SeriesNumbers, as a scanner writes them
        ds = pydicom.dcmread(f)
        ds.SeriesNumber = number
        ds.save_as(f)
    return files



def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def slabs() -> dict[str, nib.Nifti1Image]:
    return {"a": crop(40, 64), "b": crop(60, 76)}


@pytest.fixture(scope="module")
def nifti_route(server: LocalTritonServer, slabs: dict[str, nib.Nifti1Image],
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """Labels of each slab through the NIfTI route of the same CLI."""
    folder = tmp_path_factory.mktemp("nifti")
    for name, image in slabs.items():
        nib.save(image, folder / f"{name}.nii.gz")
    out = folder / "labels"
    assert client_main([str(folder), "-o", str(out), "-u", server.grpc_url, "--resolution", "lowres", "-q"]) == 0
    labels = {name: labels_of(out / f"{name}_seg.nii.gz") for name in slabs}
    assert all(np.count_nonzero(v) for v in labels.values())  # the test network finds something
    return labels


def test_dicom_folder_every_output_equals_the_nifti_route_and_resumes(
    server: LocalTritonServer, slabs: dict[str, nib.Nifti1Image], nifti_route: dict[str, np.ndarray],
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    study = tmp_path / "study"
    as_series(slabs["a"], study / "s3", "1.2.826.0.1.3680043.8.498.11", 3)
    as_series(slabs["b"], study / "s4", "1.2.826.0.1.3680043.8.498.12", 4)
    bad = as_series(crop(0, 10), study / "s5", "1.2.826.0.1.3680043.8.498.13", 5)
    bad[4].unlink()  # a missing slice: uneven spacing, refused in one line
    (study / "notes.txt").write_text("not DICOM")
    out = tmp_path / "labels"
    args = [str(study), "-o", str(out), "-u", server.grpc_url, "--resolution", "lowres", "-q",
            "--output-type", "nifti,dicom-seg,seg-nrrd", "--statistics", "--preview"]
    with caplog.at_level(logging.ERROR):
        assert client_main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "s5 (series 1.2.826.0.1.3680043.8.498.13): uneven slice spacing" in errors[0], errors
    kinds = ("_seg.nii.gz", "_seg.dcm", "_seg.seg.nrrd", "_statistics.json", "_statistics.csv", "_preview.png")
    for folder, series, name in (("s3", "series3", "a"), ("s4", "series4", "b")):
        for kind in kinds:
            assert (out / folder / f"{series}{kind}").is_file(), kind
        expected = nifti_route[name]
        np.testing.assert_array_equal(labels_of(out / folder / f"{series}_seg.nii.gz"), expected)
        np.testing.assert_allclose(nib.load(out / folder / f"{series}_seg.nii.gz").affine, slabs[name].affine,
                                   atol=1e-5)
        source = read_ct_series(study / folder)[0]
        seg_labels, segments = read_dicom_seg(out / folder / f"{series}_seg.dcm", source.datasets)
        np.testing.assert_array_equal(seg_labels, expected)
        present = [int(v) for v in np.unique(expected) if v]
        assert [s.label for s in segments] == present
        assert all(s.name == structures.structures()[s.label].name for s in segments)
        assert pydicom.dcmread(out / folder / f"{series}_seg.dcm").SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE
        nrrd = read_seg_nrrd(out / folder / f"{series}_seg.seg.nrrd")
        np.testing.assert_array_equal(nrrd.label_map, expected)
        coded = [structures.structures()[v] for v in present]  # Slicer sees each segment's SNOMED CT codes
        assert [s.terminology for s in nrrd.segments] == [terminology_entry(c.category, c.type, c.modifier)
                                                          for c in coded]
        stats = json.loads((out / folder / f"{series}_statistics.json").read_text())
        direct = structure_statistics(expected, np.asanyarray(slabs[name].dataobj), slabs[name].affine,
                                      structures.label_names())
        assert list(stats) == [row.name for row in direct]
        assert all(stats[row.name]["voxels"] == row.voxels and stats[row.name]["mean_hu"] == pytest.approx(row.mean_hu)
                   for row in direct)
    assert not [p for p in out.rglob(".*")]  # no temporary file left
    records = read_manifest(out / MANIFEST_NAME)
    assert sorted((r["series_uid"], r["status"], len(r["outputs"])) for r in records) == [
        ("1.2.826.0.1.3680043.8.498.11", "done", 6), ("1.2.826.0.1.3680043.8.498.12", "done", 6),
        ("1.2.826.0.1.3680043.8.498.13", "failed", 6)]

    # resume: a scan counts as done only when every requested output exists
    (out / "s4" / "series4_preview.png").unlink()
    bad_folder = study / "s5"
    for f in bad_folder.iterdir():
        f.unlink()
    bad_folder.rmdir()
    mtime = (out / "s3" / "series3_seg.dcm").stat().st_mtime_ns
    before = answered_requests(server.grpc_url)
    assert client_main(args) == 0
    assert answered_requests(server.grpc_url) == before + 1  # only series 4 again
    assert (out / "s4" / "series4_preview.png").is_file()
    assert (out / "s3" / "series3_seg.dcm").stat().st_mtime_ns == mtime
    assert sorted(r["status"] for r in read_manifest(out / MANIFEST_NAME)) == ["done", "skipped"]


def test_one_series_of_a_folder_and_a_structure_subset(
    server: LocalTritonServer, slabs: dict[str, nib.Nifti1Image], nifti_route: dict[str, np.ndarray],
    tmp_path: Path,
) -> None:
    folder = tmp_path / "mixed"  # two series in one folder, one file per slice each
    as_series(slabs["a"], folder, "1.2.826.0.1.3680043.8.498.21", 7)
    as_series(slabs["b"], tmp_path / "other", "1.2.826.0.1.3680043.8.498.22", 8)
    for f in (tmp_path / "other").iterdir():
        f.rename(folder / f"b_{f.name}")
    expected = nifti_route["b"]
    values, counts = np.unique(expected[expected > 0], return_counts=True)
    keep = [int(v) for v in values[np.argsort(counts)[-2:]]]
    names = [structures.label_names()[v] for v in keep]
    out = tmp_path / "labels"
    assert client_main([str(folder), "-o", str(out), "-u", server.grpc_url, "--resolution", "lowres", "-q",
                        "--series-uid", "1.2.826.0.1.3680043.8.498.22", "--roi-subset", ",".join(names),
                        "--statistics"]) == 0
    assert sorted(p.name for p in (out / "mixed").iterdir()) == [
        "series8_seg.nii.gz", "series8_statistics.csv", "series8_statistics.json"]
    subset = np.where(np.isin(expected, keep), expected, 0)
    np.testing.assert_array_equal(labels_of(out / "mixed" / "series8_seg.nii.gz"), subset)
    assert sorted(json.loads((out / "mixed" / "series8_statistics.json").read_text())) == sorted(names)


def test_refusals_before_any_request(
    server: LocalTritonServer, slabs: dict[str, nib.Nifti1Image], tmp_path: Path,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    ct = tmp_path / "ct.nii.gz"
    nib.save(slabs["b"], ct)
    dicom = tmp_path / "dicom"
    as_series(slabs["b"], dicom, "1.2.826.0.1.3680043.8.498.31", 1)
    base = ["-o", str(tmp_path / "out"), "-u", server.grpc_url, "-q"]
    before = answered_requests(server.grpc_url)
    cases = [
        ([str(ct), "--output-type", "nifti,dicom-seg"], "dicom-seg needs DICOM inputs"),
        ([str(ct), "--roi-subset", "livr", "kidney_rigth"], "'livr' (closest: liver"),
        ([str(dicom), "--series-uid", "9.9.9"], "no CT series 9.9.9 among the DICOM inputs"),
        ([str(dicom / "slice_00.dcm")], "a DICOM file is one slice: give the folder"),
    ]
    for args, message in cases:
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert client_main([*args, *base]) in (1, 2)
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and message in errors[0], (args, errors)
    # a server whose label names differ from clinical/structures.json: one line, exit 2
    names = structures.label_names()
    monkeypatch.setattr(structures, "label_names", lambda: [*names[:5], "not_liver", *names[6:]])
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert client_main([str(ct), "--output-type", "seg-nrrd", *base]) == 2
    assert "names label 5 'liver' where clinical/structures.json has 'not_liver'" in caplog.text
    assert answered_requests(server.grpc_url) == before
    assert not list((tmp_path / "out").rglob("*.nii.gz"))


@pytest.fixture(scope="module")
def orthanc() -> Iterator[local_orthanc]:
    with local_orthanc() as pacs:
        yield pacs


def test_pacs_round_trip_from_the_cli(
    server: LocalTritonServer, orthanc: local_orthanc, slabs: dict[str, nib.Nifti1Image],
    nifti_route: dict[str, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    series_uid = "1.2.826.0.1.3680043.8.498.41"
    files = as_series(slabs["a"], tmp_path / "upload", series_uid, 2)
    for f in files:  # uploaded with Orthanc's own REST API, independent of the code under test
        requests.post(f"{orthanc.url}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the pulled study goes
    out = tmp_path / "labels"
    assert client_main(["--dicomweb", orthanc.dicomweb, "--study", STUDY, "--store-seg", "-o", str(out),
                        "-u", server.grpc_url, "--resolution", "lowres", "-q", "--seg-encoding", "binary"]) == 0
    assert not list(scratch.iterdir())  # the pulled study was removed
    local = out / STUDY / series_uid / "series2_seg.dcm"
    assert local.is_file()
    segs = find_series(orthanc.dicomweb, STUDY, modality="SEG")
    assert len(segs) == 1
    seg_series, = segs
    pulled, = pull_series(orthanc.dicomweb, STUDY, seg_series, tmp_path / "seg_back")
    source = read_ct_series(tmp_path / "upload")[0]
    labels, _ = read_dicom_seg(pulled, source.datasets)
    np.testing.assert_array_equal(labels, nifti_route["a"])
    stored = pydicom.dcmread(pulled)  # --seg-encoding binary: the classic SOP class, uncompressed
    assert (stored.SOPClassUID, stored.SegmentationType) == (SEGMENTATION_STORAGE, "BINARY")
    assert stored.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    meta = requests.get(f"{orthanc.dicomweb}/studies/{STUDY}/series/{seg_series}/metadata", timeout=10).json()
    assert meta[0]["0020000D"]["Value"][0] == STUDY
    assert meta[0]["00081115"]["Value"][0]["0020000E"]["Value"][0] == series_uid  # ReferencedSeriesSequence
    # a rerun skips the segmentation and stores the same SEG again: still one SEG instance in the study
    assert client_main(["--dicomweb", orthanc.dicomweb, "--study", STUDY, "--series", series_uid, "--store-seg",
                        "-o", str(out), "-u", server.grpc_url, "--resolution", "lowres", "-q",
                        "--seg-encoding", "binary"]) == 0
    assert len(requests.get(f"{orthanc.dicomweb}/studies/{STUDY}/series/{seg_series}/instances",
                            timeout=10).json()) == 1


def test_discovery_names_every_series_distinctly(slabs: dict[str, nib.Nifti1Image], tmp_path: Path) -> None:
    """No server: series named by SeriesNumber, by UID when numbers repeat; a .zip; a lone slice reported."""
    small = crop(40, 43)
    as_series(small, tmp_path / "in" / "p1" / "dicom", "1.2.826.0.1.3680043.8.498.51", 2)
    as_series(small, tmp_path / "in" / "p1" / "dicom" / "more", "1.2.826.0.1.3680043.8.498.52", 3)
    as_series(small, tmp_path / "in" / "p2", "1.2.826.0.1.3680043.8.498.53", 2)
    as_series(small, tmp_path / "in" / "p2" / "again", "1.2.826.0.1.3680043.8.498.54", 2)
    zipped = as_series(small, tmp_path / "zip", "1.2.826.0.1.3680043.8.498.55", 9)
    with zipfile.ZipFile(tmp_path / "in" / "p3.ZIP", "w") as archive:
        for f in zipped:
            archive.write(f, f.name)
    (tmp_path / "in" / "lone").mkdir()
    (tmp_path / "in" / "lone" / "x.txt").write_text("a folder without DICOM")
    single = tmp_path / "in" / "lone" / "slice.dcm"
    single.write_bytes(zipped[0].read_bytes())
    found = discover([tmp_path / "in"])
    assert [(str(s.relative), s.series_uid) for s in found.scans] == [
        ("lone/series9", "1.2.826.0.1.3680043.8.498.55"),  # a folder with one slice: a scan that fails to read
        ("p1/dicom/series2", "1.2.826.0.1.3680043.8.498.51"), ("p1/dicom/series3", "1.2.826.0.1.3680043.8.498.52"),
        ("p2/1.2.826.0.1.3680043.8.498.53", "1.2.826.0.1.3680043.8.498.53"),
        ("p2/1.2.826.0.1.3680043.8.498.54", "1.2.826.0.1.3680043.8.498.54"),
        ("p3/series9", "1.2.826.0.1.3680043.8.498.55")]
    assert found.problems == []
    with pytest.raises(ScanError, match=r"lone \(series 1\.2\.826\.0\.1\.3680043\.8\.498\.55\): has 1 slice"):
        found.scans[0].read_header()
    alone = discover([single])  # a DICOM file given by itself
    assert alone.scans == [] and alone.problems == [
        f"{single}: a DICOM file is one slice: give the folder (or .zip) holding its series"]
    found.scans.pop(0)
    plan = plan_outputs(found.scans, tmp_path / "out", make_writers(["nifti", "dicom-seg"], statistics=True), "_seg")
    paths = [p for outputs in plan.values() for p in outputs]
    assert len(paths) == len(set(paths)) == 5 * 4
    volume = found.scans[4].read_volume()
    np.testing.assert_array_equal(volume.array, np.asanyarray(small.dataobj))
    assert volume.source_datasets is not None and len(volume.source_datasets) == 3


def test_help_teaches_dicom_outputs_and_pacs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        client_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for example in ("python -m client study/ -o labels/ --output-type nifti,dicom-seg", "--series-uid",
                    "--statistics --preview", "--roi-subset liver spleen", "--dicomweb http://pacs:8042/dicom-web",
                    "--store-seg", "--padding-to-air", "padded_percent, missing_outputs", "--verbose",
                    "--seg-encoding binary"):
        assert example in text, example
    with pytest.raises(SystemExit) as exit_info:  # an encoding without a DICOM-SEG output is a usage error
        client_main(["ct.nii.gz", "--seg-encoding", "binary"])
    assert exit_info.value.code == 2
    assert "--seg-encoding is for DICOM-SEG outputs" in capsys.readouterr().err


def test_a_series_without_uids_keeps_its_other_outputs_and_a_name_of_its_own(
    server: LocalTritonServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The README's real Siemens series, whose anonymiser emptied its UIDs: the DICOM-SEG is refused before the
    request in one line, the NIfTI and seg.nrrd are written, the scan counts as done without all outputs."""
    deep = tmp_path / "/".join(["a_rather_long_folder_name_of_a_cohort_export"] * 5)  # once: "File name too long"
    deep.parent.mkdir(parents=True)
    shutil.copytree(real_ct_dicom(), deep)
    out = tmp_path / "labels"
    args = [str(deep), "-o", str(out), "-u", server.grpc_url, "--resolution", "lowres", "-q",
            "--output-type", "nifti,dicom-seg,seg-nrrd"]
    before = answered_requests(server.grpc_url)
    with caplog.at_level(logging.ERROR):
        assert client_main(args) == 1  # a requested output is missing
    assert answered_requests(server.grpc_url) == before + 1
    made = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    name = made[0].split("/")[-1].split("_seg")[0]
    assert re.fullmatch(r"series-[0-9a-f]{8}", name), made  # the series' own identity, no machine path
    folder = deep.name
    assert made == [f"{folder}/{name}_seg.nii.gz", f"{folder}/{name}_seg.seg.nrrd"]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [(f"error: {deep} (series no SeriesInstanceUID): {name}_seg.dcm not written: its DICOM files "
                       "lack StudyInstanceUID (anonymised away?), which a DICOM-SEG must reference; write nifti or "
                       "seg-nrrd for it")]
    record, = read_manifest(out / MANIFEST_NAME)
    assert record["status"] == "done" and record["series_uid"] == "no SeriesInstanceUID"
    assert record["missing_outputs"] == [str(out / folder / f"{name}_seg.dcm")] and record["padded_percent"] == 0.0
    # a SEG alone cannot be made: refused before any request
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert client_main([*args[:-1], "dicom-seg", "-o", str(tmp_path / "seg_only")]) == 1
    assert answered_requests(server.grpc_url) == before + 1
    assert "not segmented, no output can be made: " in caplog.text


def test_padding_is_reported_and_sent_as_air_only_when_asked(server: LocalTritonServer, tmp_path: Path) -> None:
    """The real series with its field-of-view corners padded (PixelPaddingValue): by default its labels are
    those of dcm2niix's NIfTI of it through the same CLI (padding passed on as dcm2niix does); with
    --padding-to-air, those of the same NIfTI with the padding at -1024 HU. The share is in the manifest."""
    from perf.padding_effect import AIR_HU, write_padded_series

    hu, affine, outside = write_padded_series(tmp_path / "padded")
    share = round(100.0 * outside.mean(), 2)
    exe = shutil.which("dcm2niix")
    assert exe, "dcm2niix is not installed: run `make clinical-tools` (Debian package dcm2niix)"
    (tmp_path / "ref").mkdir()
    subprocess.run([exe, "-z", "y", "-b", "n", "-f", "padded", "-o", str(tmp_path / "ref"), str(tmp_path / "padded")],
                   check=True, capture_output=True)
    converted = nib.load(tmp_path / "ref" / "padded.nii.gz")
    aired = np.where(outside[:, :, None], AIR_HU, hu).astype(np.int16)
    nib.save(nib.Nifti1Image(aired, affine), tmp_path / "ref" / "aired.nii.gz")
    base = ["-u", server.grpc_url, "--resolution", "lowres", "-q"]

    def labels(source: Path, out: str, *extra: str) -> np.ndarray:
        assert client_main([str(source), "-o", str(tmp_path / out), *base, *extra]) == 0
        path, = (tmp_path / out).rglob("*_seg.nii.gz")
        return np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj)

    as_is = labels(tmp_path / "padded", "as_is")
    assert read_manifest(tmp_path / "as_is" / MANIFEST_NAME)[0]["padded_percent"] == share
    np.testing.assert_array_equal(as_is, labels(tmp_path / "ref" / "padded.nii.gz", "dcm2niix_route"))
    assert np.asanyarray(converted.dataobj).min() == -3024  # dcm2niix passes the padding on too
    to_air = labels(tmp_path / "padded", "to_air", "--padding-to-air")
    assert read_manifest(tmp_path / "to_air" / MANIFEST_NAME)[0]["padded_percent"] == share
    np.testing.assert_array_equal(to_air, labels(tmp_path / "ref" / "aired.nii.gz", "aired_route"))
    assert not np.array_equal(as_is, to_air)  # the padded circle moves the whole-volume normalisation
