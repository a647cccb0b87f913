"""clinical.dicom_series: DICOM CT series -> the same volume and RAS affine as the NIfTI they came from.

Series are generated with pydicom from the real NIfTI CTs the project uses (CT Image Storage, one file
per slice, LPS, rescale slope/intercept), one with gantry tilt, compressed ones, a folder with two series;
the real Siemens series of TotalSegmentator's archive (JPEG 2000) is read too. dcm2niix (Debian) is the
careful converter whose geometry ours must equal.

Assembly as forgiving as dcm2niix, each case generated from the same real CTs: duplicate files (also of
the UID-less real series) dropped, an untagged scout, a reformat of another orientation and a DERIVED
image set aside by name, other objects (MR, RTSTRUCT, SR) reported once with their counts, two phases
refused with files and positions counted apart, Enhanced and Legacy Converted Enhanced CT (highdicom)
read as the single-frame series, files without preamble or extension found by the client, pixel padding
passed through as dcm2niix does and measured.
"""

from __future__ import annotations

import copy
import logging
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from clinical.dicom_series import (
    ENHANCED_CT_STORAGE,
    DicomInputError,
    list_ct_series,
    read_ct_series,
    survey,
    write_ct_series,
)
from wholebody.sample_data import real_ct, real_ct_dicom


@pytest.fixture(scope="module")
def example_ct() -> nib.Nifti1Image:
    return nib.load(real_ct("example_ct"))  # RAS, 3 mm, int32 HU -1207..3382


@pytest.fixture(scope="module")
def aorta_crop() -> nib.Nifti1Image:
    img = nib.load(real_ct("aorta_ct"))  # axis codes L,P,S, 1.5 mm, int16
    return img.slicer[:, :, 60:100]


def dcm2niix(folder: Path, out: Path) -> list[Path]:
    """dcm2niix's NIfTI files for `folder` (the reference converter; installed by `make clinical-tools`)."""
    exe = shutil.which("dcm2niix")
    assert exe, "dcm2niix is not installed: run `make clinical-tools` (Debian package dcm2niix)"
    out.mkdir()
    subprocess.run([exe, "-z", "n", "-b", "n", "-f", "ref", "-o", str(out), str(folder)], check=True,
                   capture_output=True)
    return sorted(out.glob("*.nii"))


def assert_same_image(ours: tuple[np.ndarray, np.ndarray], reference: nib.Nifti1Image) -> None:
    """Same voxels at the same places, whatever the axis order/flips (both to RAS canonical order)."""
    a = nib.as_closest_canonical(nib.Nifti1Image(ours[0], ours[1]))
    b = nib.as_closest_canonical(reference)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))


def test_series_from_a_nifti_gives_back_its_volume_and_affine(example_ct: nib.Nifti1Image, tmp_path: Path) -> None:
    hu = np.asanyarray(example_ct.dataobj)
    write_ct_series(hu, example_ct.affine, tmp_path / "ct", intercept=-1024)
    series, = read_ct_series(tmp_path / "ct")
    assert series.volume.dtype == np.int16  # exact integers: no float copy
    np.testing.assert_array_equal(series.volume, hu)
    np.testing.assert_allclose(series.affine, example_ct.affine, atol=1e-6)
    assert not series.sheared and series.spacing == pytest.approx((3.0, 3.0, 3.0))
    # the slices are LPS with a rescale, as scanners write them
    ds = pydicom.dcmread(next((tmp_path / "ct").iterdir()))
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and float(ds.RescaleIntercept) == -1024
    assert [float(v) for v in ds.ImageOrientationPatient] == [-1, 0, 0, 0, -1, 0]
    (ref,) = dcm2niix(tmp_path / "ct", tmp_path / "ref")
    assert_same_image((series.volume, series.affine), nib.load(ref))


def test_lps_axis_codes_and_non_integer_slope(aorta_crop: nib.Nifti1Image, tmp_path: Path) -> None:
    hu = np.asanyarray(aorta_crop.dataobj)
    write_ct_series(hu, aorta_crop.affine, tmp_path / "ct", slope=0.5, intercept=-1000)
    series, = read_ct_series(tmp_path / "ct")
    assert series.volume.dtype == np.int16  # 0.5 * even stored values: still exact integers
    np.testing.assert_array_equal(series.volume, hu)
    np.testing.assert_allclose(series.affine, aorta_crop.affine, atol=1e-6)
    # a slope whose HU are not integers comes back float32, as stored * slope + intercept
    write_ct_series(hu, aorta_crop.affine, tmp_path / "float", slope=0.3, intercept=-1000.5)
    series, = read_ct_series(tmp_path / "float")
    assert series.volume.dtype == np.float32
    expected = np.round((hu - -1000.5) / 0.3) * 0.3 - 1000.5
    np.testing.assert_allclose(series.volume, expected, atol=1e-3)


def test_gantry_tilt_gives_the_sheared_affine_dcm2niix_gives(example_ct: nib.Nifti1Image, tmp_path: Path) -> None:
    affine = example_ct.affine.copy()
    affine[1, 2] = 3.0 * np.tan(np.radians(15))  # slices step along y as well as z: a 15° tilted gantry
    write_ct_series(np.asanyarray(example_ct.dataobj), affine, tmp_path / "ct", gantry_tilt_deg=15)
    series, = read_ct_series(tmp_path / "ct")
    assert series.sheared
    np.testing.assert_allclose(series.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(series.volume, np.asanyarray(example_ct.dataobj))
    refs = dcm2niix(tmp_path / "ct", tmp_path / "ref")  # ref.nii: as acquired (sheared); ref_Tilt_1.nii: resampled
    untilted = [p for p in refs if "Tilt" not in p.name]
    assert len(untilted) == 1
    assert_same_image((series.volume, series.affine), nib.load(untilted[0]))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_transfer_syntaxes(aorta_crop: nib.Nifti1Image, tmp_path: Path, syntax: str) -> None:
    hu = np.asanyarray(aorta_crop.dataobj)[:, :, :8]
    write_ct_series(hu, aorta_crop.affine, tmp_path / "ct", transfer_syntax=syntax)
    assert pydicom.dcmread(next((tmp_path / "ct").iterdir())).file_meta.TransferSyntaxUID == syntax
    series, = read_ct_series(tmp_path / "ct")
    np.testing.assert_array_equal(series.volume, hu)
    broken = sorted((tmp_path / "ct").iterdir())[3]
    ds = pydicom.dcmread(broken)
    ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])  # a frame no decoder can read
    ds.save_as(broken)
    expected = "^" + re.escape(f"{broken}: cannot decode its pixel data ({syntax.name})")
    with pytest.raises(DicomInputError, match=expected) as err:
        read_ct_series(tmp_path / "ct")
    assert "\n" not in str(err.value)


def test_real_siemens_series_matches_dcm2niix(tmp_path: Path) -> None:
    folder = real_ct_dicom()  # JPEG 2000 lossless, UIDs blanked by its anonymiser
    series, = read_ct_series(folder)
    assert series.volume.shape == (512, 512, 20) and series.volume.dtype == np.int16
    assert series.spacing == pytest.approx((0.9765625, 0.9765625, 2.0))
    (ref,) = dcm2niix(folder, tmp_path / "ref")
    assert_same_image((series.volume, series.affine), nib.load(ref))


def test_folder_with_two_series_a_zip_and_other_files(
        example_ct: nib.Nifti1Image, aorta_crop: nib.Nifti1Image, tmp_path: Path) -> None:
    folder = tmp_path / "study"
    write_ct_series(np.asanyarray(example_ct.dataobj), example_ct.affine, folder / "a", series_uid="1.2.3.1")
    write_ct_series(np.asanyarray(aorta_crop.dataobj), aorta_crop.affine, folder / "b", series_uid="1.2.3.2")
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "b" / "slice_00.dcm").write_bytes(_without_part10_header(folder / "b" / "slice_00.dcm"))
    assert list_ct_series(folder) == {"1.2.3.1": 112, "1.2.3.2": 40}
    both = {s.series_uid: s for s in read_ct_series(folder)}
    np.testing.assert_array_equal(both["1.2.3.2"].volume, np.asanyarray(aorta_crop.dataobj))
    one, = read_ct_series(folder, series_uid="1.2.3.1")
    np.testing.assert_allclose(one.affine, example_ct.affine, atol=1e-6)
    with pytest.raises(DicomInputError, match=r"no CT series 9\.9.*1\.2\.3\.1 \(112 slices\)"):
        read_ct_series(folder, series_uid="9.9")
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in (folder / "b").iterdir():
            z.write(f, f"dicom/{f.name}")
    from_zip, = read_ct_series(archive)
    np.testing.assert_array_equal(from_zip.volume, both["1.2.3.2"].volume)
    np.testing.assert_array_equal(from_zip.affine, both["1.2.3.2"].affine)


def _without_part10_header(path: Path) -> bytes:
    """The bare data set of a DICOM file (no preamble, no 'DICM', no file meta), as old exports write them."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds = pydicom.dcmread(path)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_uneven_spacing_and_phases_are_refused_in_one_line(aorta_crop: nib.Nifti1Image, tmp_path: Path) -> None:
    files = write_ct_series(np.asanyarray(aorta_crop.dataobj)[:, :, :10], aorta_crop.affine, tmp_path / "ct",
                            series_uid="1.2.3.4")
    files[4].unlink()  # a missing slice
    with pytest.raises(DicomInputError) as err:
        read_ct_series(tmp_path / "ct")
    message = str(err.value)
    assert "\n" not in message and "series 1.2.3.4" in message and "uneven slice spacing (1.500-3.000 mm" in message
    shutil.copy(files[5], tmp_path / "ct" / "copy.dcm")  # a copy is dropped: still the missing slice that refuses
    with pytest.raises(DicomInputError, match="uneven slice spacing"):
        read_ct_series(tmp_path / "ct")
    # two phases in one series: 48 files at 24 positions, counted apart, and what tells them apart
    hu = np.asanyarray(aorta_crop.dataobj)[:, :, :24]
    write_ct_series(hu, aorta_crop.affine, tmp_path / "phases" / "a", series_uid="1.2.3.5")
    for f in write_ct_series(hu + 40, aorta_crop.affine, tmp_path / "phases" / "b", series_uid="1.2.3.5"):
        ds = pydicom.dcmread(f)
        ds.AcquisitionNumber = 2
        ds.save_as(f)
    with pytest.raises(DicomInputError) as err:
        read_ct_series(tmp_path / "phases")
    assert str(err.value) == (
        f"{tmp_path / 'phases'}: series 1.2.3.5: 48 files at 24 positions (2 at each: several acquisitions, phases "
        "or echoes in one series; they differ in AcquisitionNumber); split the series, e.g. by AcquisitionNumber or "
        "TemporalPositionIndex")


def test_inputs_without_a_ct_series_say_so(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomInputError, match="no CT image series found"):
        read_ct_series(tmp_path / "empty")
    with pytest.raises(DicomInputError, match="no such file or folder"):
        read_ct_series(tmp_path / "missing")


def test_a_localizer_is_named_once_per_source_however_often_the_series_is_read(
        aorta_crop: nib.Nifti1Image, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from client.inputs import DicomFormat, discover

    folder = tmp_path / "study"
    write_ct_series(np.asanyarray(aorta_crop.dataobj), aorta_crop.affine, folder, series_uid="1.2.3.2")
    scout = pydicom.dcmread(folder / "slice_00.dcm")
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.SOPInstanceUID = "1.2.3.2.999"
    scout.save_as(folder / "scout.dcm")
    with caplog.at_level("INFO"):
        scan, = discover([folder]).scans
        DicomFormat().read_header(folder, scan.series_uid)
        DicomFormat().read_volume(folder, scan.series_uid)
    lines = [r.getMessage() for r in caplog.records if "localizer" in r.getMessage()]
    assert lines == [f"{folder}: 1 localizer image skipped"]


def _resave(path: Path, target: Path, **changes: object) -> Path:
    """`path` saved as `target` with `changes` (attribute -> value) and a new SOPInstanceUID."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(target)
    return target


def test_duplicates_are_dropped_naming_both_files_as_dcm2niix_does(aorta_crop: nib.Nifti1Image,
                                                                   tmp_path: Path) -> None:
    hu = np.asanyarray(aorta_crop.dataobj)
    files = write_ct_series(hu, aorta_crop.affine, tmp_path / "ct", series_uid="1.2.3.6")
    shutil.copy(files[3], tmp_path / "ct" / "z_copy.dcm")  # the same file twice (an export merged twice)
    again = pydicom.dcmread(files[5])  # the same instance, re-encoded by a PACS: other bytes, same pixel values
    again.compress(RLELossless, generate_instance_uid=False)
    again.save_as(tmp_path / "ct" / "z_rle.dcm")
    found = survey(tmp_path / "ct")
    assert [s.slices for s in found.series] == [40]
    assert found.notes == [f"{tmp_path / 'ct' / 'z_copy.dcm'}: dropped, a copy of {files[3]}",
                           f"{tmp_path / 'ct' / 'z_rle.dcm'}: dropped, the same image as {files[5]}, encoded otherwise"]
    series, = read_ct_series(tmp_path / "ct")
    np.testing.assert_array_equal(series.volume, hu)
    assert len(series.datasets) == 40 and series.notes == found.notes
    refs = dcm2niix(tmp_path / "ct", tmp_path / "ref")
    assert len(refs) == 1  # dcm2niix drops them too
    assert_same_image((series.volume, series.affine), nib.load(refs[0]))
    # the real Siemens series, whose anonymiser emptied the UIDs: a copy (no extension) is known by place and number
    real = tmp_path / "real"
    shutil.copytree(real_ct_dicom(), real)
    first = min(real.iterdir())
    shutil.copy(first, real / "copy_without_extension")
    series, = read_ct_series(real)
    assert series.volume.shape == (512, 512, 20) and series.notes == [
        f"{real / 'copy_without_extension'}: dropped, a copy of {first}"]
    (ref,) = dcm2niix(real_ct_dicom(), tmp_path / "ref_real")
    assert_same_image((series.volume, series.affine), nib.load(ref))


def test_images_of_another_geometry_are_set_aside_each_named(aorta_crop: nib.Nifti1Image, tmp_path: Path) -> None:
    hu = np.asanyarray(aorta_crop.dataobj)
    folder = tmp_path / "ct"
    files = write_ct_series(hu, aorta_crop.affine, folder, series_uid="1.2.3.7")
    # a scout not tagged LOCALIZER: coronal, 40 rows
    scout = _resave(files[0], folder / "scout.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0, -1], Rows=40)
    ds = pydicom.dcmread(scout)
    ds.PixelData = np.zeros((40, ds.Columns), np.int16).tobytes()
    ds.save_as(scout)
    # a derived reformat of another orientation, same size, inside the axial series
    sagittal = _resave(files[1], folder / "reformat.dcm", ImageType=["DERIVED", "SECONDARY", "OTHER"],
                       ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    # a DERIVED axial image among ORIGINAL ones (an annotated copy of slice 7): the odd one out by ImageType
    derived = _resave(files[7], folder / "annotated.dcm", ImageType=["DERIVED", "SECONDARY", "AXIAL"])
    found = survey(folder)
    assert [s.slices for s in found.series] == [40]
    assert sorted(found.notes) == sorted([
        f"{derived}: set aside (a DERIVED image among 40 ORIGINAL ones); series 1.2.3.7 is read without it",
        (f"{sagittal}: set aside (sagittal where the series' 41 images are axial: a scout or another "
         "reconstruction?); series 1.2.3.7 is read without it"),
        (f"{scout}: set aside (40x233 pixels where the series' 41 images have 167x233: a scout or another "
         "reconstruction?); series 1.2.3.7 is read without it")])
    series, = read_ct_series(folder)
    np.testing.assert_array_equal(series.volume, hu)
    np.testing.assert_allclose(series.affine, aorta_crop.affine, atol=1e-6)
    refs = dcm2niix(folder, tmp_path / "ref")  # dcm2niix sets them apart too: one volume each
    assert sorted(nib.load(r).shape[:3] for r in refs) == [(233, 40, 1), (233, 167, 1), (233, 167, 1),
                                                           (233, 167, 40)]
    volume, = [r for r in refs if nib.load(r).shape[:3] == (233, 167, 40)]
    assert_same_image((series.volume, series.affine), nib.load(volume))
    # two geometries with as many images each: no majority, refused naming both
    tie = tmp_path / "tie"
    tie.mkdir()
    for f in files[:2]:
        shutil.copy(f, tie / f.name)
    for i in range(2):
        _resave(files[i], tie / f"sag{i}.dcm", ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    with pytest.raises(DicomInputError, match="images of several geometries and none held by most") as err:
        read_ct_series(tie)
    assert "2 of 167x233 axial at 1.5 x 1.5 mm" in str(err.value) and "2 of 167x233 sagittal" in str(err.value)


def _object(folder: Path, name: str, sop_class: str, modality: str, series_uid: str) -> Path:
    """A minimal non-image DICOM object (RTSTRUCT, SR...) as a Part-10 file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), series_uid
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(folder / name, enforce_file_format=True)
    return folder / name


def test_other_objects_are_reported_once_with_their_counts(
        aorta_crop: nib.Nifti1Image, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from client.inputs import discover

    study = tmp_path / "study"  # one export: the CT's files, the other objects in sub-folders
    hu = np.asanyarray(aorta_crop.dataobj)[:, :, :24]
    write_ct_series(hu, aorta_crop.affine, study, series_uid="1.2.3.8")
    for f in write_ct_series(hu, aorta_crop.affine, study / "mr", series_uid="1.2.3.9"):  # an MR series beside it
        ds = pydicom.dcmread(f)
        ds.Modality, ds.SOPClassUID = "MR", pydicom.uid.MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
        ds.save_as(f)
    _object(study / "rt", "rtstruct.dcm", pydicom.uid.RTStructureSetStorage, "RTSTRUCT", "1.2.3.10")
    _object(study / "sr", "sr.dcm", pydicom.uid.ComprehensiveSRStorage, "SR", "1.2.3.11")
    (study / "notes.txt").write_text("not DICOM")
    with caplog.at_level(logging.INFO):
        scan, = discover([study]).scans
        scan.read_header()
        scan.read_volume()
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert lines == [
        f"{study}: skipped MR series 1.2.3.9 (MR Image Storage, 24 files): not a CT image",
        f"{study}: skipped RTSTRUCT series 1.2.3.10 (RT Structure Set Storage, 1 file): not a CT image",
        f"{study}: skipped SR series 1.2.3.11 (Comprehensive SR Storage, 1 file): not a CT image",
        f"{study}: 1 file skipped, not DICOM images"]
    assert scan.series_uid == "1.2.3.8"
    with pytest.raises(DicomInputError, match=r"no CT image series found \(1 MR series \(24 files\), 0 other files\)"):
        read_ct_series(study / "mr")
    with pytest.raises(DicomInputError, match=r"no CT series 1\.2\.3\.9 \(it is MR \(MR Image Storage\), not a CT"):
        read_ct_series(study, series_uid="1.2.3.9")
    found = discover([study / "mr"])
    assert found.scans == [] and found.problems == [
        (f"{study / 'mr'}: no CT image series in it (1 MR series (24 files), 0 other files); CT Image Storage (one "
         "file per slice) and Enhanced / Legacy Converted Enhanced CT are read")]


def _enhanced(legacy: hd.legacy.LegacyConvertedEnhancedCTImage) -> Dataset:
    """An Enhanced CT Image Storage instance from a Legacy Converted one: the orientation moved from the shared to
    the per-frame functional groups and the frames stored in reverse order, as a scanner may."""
    ds = Dataset(legacy)
    ds.file_meta = legacy.file_meta
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT_STORAGE
    shared = ds.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence
    del shared.PlaneOrientationSequence
    frames = list(ds.PerFrameFunctionalGroupsSequence)[::-1]
    for item in frames:
        item.PlaneOrientationSequence = copy.deepcopy(orientation)
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.ascontiguousarray(legacy.pixel_array[::-1]).tobytes()
    return ds


@pytest.mark.parametrize("kind", ["legacy-converted", "enhanced"])
def test_multiframe_ct_is_read_as_its_single_frame_series_and_as_dcm2niix_reads_it(
        aorta_crop: nib.Nifti1Image, tmp_path: Path, kind: str) -> None:
    from client.inputs import discover
    from client.outputs import DicomSegWriter

    hu = np.asanyarray(aorta_crop.dataobj)
    files = write_ct_series(hu, aorta_crop.affine, tmp_path / "single", series_uid="1.2.3.12")
    legacy = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(f) for f in files], series_instance_uid="1.2.3.13", series_number=2,
        sop_instance_uid="1.2.3.13.1", instance_number=1)
    ds = legacy if kind == "legacy-converted" else _enhanced(legacy)
    (tmp_path / "multi").mkdir()
    path = tmp_path / "multi" / "ct.dcm"
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames == 40
    single, = read_ct_series(tmp_path / "single")
    multi, = read_ct_series(tmp_path / "multi")
    assert multi.multiframe and len(multi.datasets) == 1 and multi.volume.dtype == np.int16
    np.testing.assert_array_equal(multi.volume, single.volume)
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    (ref,) = dcm2niix(tmp_path / "multi", tmp_path / "ref")
    assert_same_image((multi.volume, multi.affine), nib.load(ref))
    # the client finds it in its folder, and as a lone file (a multi-frame file is a whole volume)
    for given in (tmp_path / "multi", path):
        scan, = discover([given]).scans
        assert scan.series_uid == "1.2.3.13"
        volume = scan.read_volume()
        np.testing.assert_array_equal(volume.array, single.volume)
    # its DICOM-SEG is refused before any request (the SEG writer references single-frame slices)
    assert "a DICOM-SEG of a multi-frame (enhanced) CT is not written" in str(DicomSegWriter().refusal(volume))


def test_files_without_preamble_or_extension_are_found_by_the_client(
        aorta_crop: nib.Nifti1Image, tmp_path: Path) -> None:
    from client.inputs import discover

    hu = np.asanyarray(aorta_crop.dataobj)[:, :, :12]
    folder = tmp_path / "export" / "IMAGES"
    for f in write_ct_series(hu, aorta_crop.affine, tmp_path / "ct", series_uid="1.2.3.14"):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"IM{f.stem[-2:]}").write_bytes(_without_part10_header(f))  # no preamble, no 'DICM', no .dcm
    (folder / "README").write_text("an old export")
    found = discover([tmp_path / "export"])
    assert found.problems == [] and [str(s.relative) for s in found.scans] == ["IMAGES/series1"]
    volume = found.scans[0].read_volume()
    np.testing.assert_array_equal(volume.array, hu)
    (ref,) = dcm2niix(folder, tmp_path / "ref")
    assert_same_image((volume.array, volume.affine), nib.load(ref))


def test_pixel_padding_passes_through_as_dcm2niix_gives_it_and_is_measured(
        example_ct: nib.Nifti1Image, tmp_path: Path) -> None:
    from client.inputs import AIR_HU, Volume, measure_padding, nifti_like

    hu = np.asanyarray(example_ct.dataobj)[:, :, 40:60].astype(np.int16)
    x, y = np.meshgrid(np.arange(hu.shape[0]), np.arange(hu.shape[1]), indexing="ij")
    outside = (x - hu.shape[0] / 2) ** 2 + (y - hu.shape[1] / 2) ** 2 > (hu.shape[1] / 2) ** 2  # out of the FOV
    padded = hu.copy()
    padded[outside] = -3024  # stored -2000 with intercept -1024, as scanners pad
    files = write_ct_series(padded, example_ct.affine, tmp_path / "ct", series_uid="1.2.3.15")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.add_new(0x00280120, "SS", -2000)  # PixelPaddingValue, signed as the pixels
        ds.save_as(f)
    series, = read_ct_series(tmp_path / "ct")
    np.testing.assert_array_equal(series.volume, padded)  # passed through: what dcm2niix gives
    (ref,) = dcm2niix(tmp_path / "ct", tmp_path / "ref")
    assert_same_image((series.volume, series.affine), nib.load(ref))
    assert series.padding_hu == [(-3024.0, -3024.0)] * 20
    volume = Volume(series.volume.copy(), series.affine, nifti_like(series.affine), series.datasets, series.padding_hu)
    assert measure_padding(volume) == outside.sum() * 20
    assert measure_padding(volume, to_air=True) == outside.sum() * 20
    np.testing.assert_array_equal(volume.array, np.where(outside[:, :, None], AIR_HU, hu))
    assert measure_padding(volume) == 0
    # without the tag (NIfTI): voxels below -2000 HU
    untagged = Volume(padded.copy(), series.affine, nifti_like(series.affine))
    assert measure_padding(untagged, to_air=True) == outside.sum() * 20
    np.testing.assert_array_equal(untagged.array, np.where(outside[:, :, None], AIR_HU, hu))
