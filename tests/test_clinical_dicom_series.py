"""clinical.dicom_series: DICOM CT series -> the same volume and RAS affine as the NIfTI they came from.

Series are generated with pydicom from the real NIfTI CTs the project uses (CT Image Storage, one file
per slice, LPS, rescale slope/intercept), one with gantry tilt, compressed ones, a folder with two series;
the real Siemens series of TotalSegmentator's archive (JPEG 2000) is read too. dcm2niix (Debian) is the
careful converter whose geometry ours must equal.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from clinical.dicom_series import DicomInputError, list_ct_series, read_ct_series, write_ct_series
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


def test_uneven_spacing_and_duplicates_are_refused_in_one_line(aorta_crop: nib.Nifti1Image, tmp_path: Path) -> None:
    files = write_ct_series(np.asanyarray(aorta_crop.dataobj)[:, :, :10], aorta_crop.affine, tmp_path / "ct",
                            series_uid="1.2.3.4")
    files[4].unlink()  # a missing slice
    with pytest.raises(DicomInputError) as err:
        read_ct_series(tmp_path / "ct")
    message = str(err.value)
    assert "\n" not in message and "series 1.2.3.4" in message and "uneven slice spacing (1.500-3.000 mm" in message
    shutil.copy(files[5], tmp_path / "ct" / "copy.dcm")  # two slices at one position
    with pytest.raises(DicomInputError, match="2 slices share a position"):
        read_ct_series(tmp_path / "ct")


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
