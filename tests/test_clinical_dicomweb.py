"""clinical.dicomweb against a real Orthanc with its DICOMweb plugin: upload a CT series, pull it, store a
DICOM-SEG of it, find the SEG in the study and read it back.

The label map is a stand-in computed here (the client's segmentation is wired to this by the CLI).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from clinical.dicom_seg import read_dicom_seg, write_dicom_seg
from clinical.dicom_series import read_ct_series, write_ct_series
from clinical.dicomweb import DicomWebError, find_series, pull_series, pulled_study, store
from tests.orthanc import local_orthanc
from wholebody.sample_data import real_ct


@pytest.fixture(scope="module")
def orthanc() -> Iterator[local_orthanc]:
    with local_orthanc() as pacs:
        yield pacs


def test_pacs_round_trip(orthanc: local_orthanc, tmp_path: Path) -> None:
    img = nib.load(real_ct("example_ct"))
    hu = np.asanyarray(img.dataobj)[:, :, 30:70]
    files = write_ct_series(hu, img.affine, tmp_path / "upload", study_uid="1.2.826.0.1.3680043.8.498.1",
                            series_uid="1.2.826.0.1.3680043.8.498.2", patient_id="P7")
    for f in files:  # uploaded with Orthanc's own REST API, independent of the code under test
        requests.post(f"{orthanc.url}/instances", data=f.read_bytes(), timeout=30).raise_for_status()
    study = "1.2.826.0.1.3680043.8.498.1"

    assert find_series(orthanc.dicomweb, study) == {"1.2.826.0.1.3680043.8.498.2": 40}
    with pulled_study(orthanc.dicomweb, study) as folder:
        series, = read_ct_series(folder)
        pulled = folder
    assert not pulled.exists()  # the temporary folder is gone
    np.testing.assert_array_equal(series.volume, hu)
    np.testing.assert_allclose(series.affine, img.affine, atol=1e-6)

    # a stand-in label map: "liver" where the CT is soft tissue in the upper half, "spleen" in a box
    label_map = np.where((series.volume > 0) & (series.volume < 200), 5, 0).astype(np.uint8)
    label_map[20:40, 20:40, :10] = 1
    seg_path = write_dicom_seg(label_map, series.datasets, tmp_path / "seg.dcm")
    store(orthanc.dicomweb, [seg_path])

    segs = find_series(orthanc.dicomweb, study, modality="SEG")
    assert len(segs) == 1
    seg_series_uid, = segs
    pulled_seg, = pull_series(orthanc.dicomweb, study, seg_series_uid, tmp_path / "seg_back")
    back, segments = read_dicom_seg(pulled_seg, series.datasets)
    np.testing.assert_array_equal(back, label_map)
    assert [s.name for s in segments] == ["spleen", "liver"]
    # Orthanc files the SEG under the CT's study, referencing the CT series
    tags = requests.get(f"{orthanc.url}/series", timeout=10).json()
    assert len(tags) == 2
    info = requests.get(f"{orthanc.dicomweb}/studies/{study}/series/{seg_series_uid}/metadata", timeout=10).json()
    referenced = info[0]["00081115"]["Value"][0]["0020000E"]["Value"][0]  # ReferencedSeriesSequence
    assert referenced == "1.2.826.0.1.3680043.8.498.2"


def test_pacs_errors_name_the_server_and_the_fix(orthanc: local_orthanc, tmp_path: Path) -> None:
    with pytest.raises(DicomWebError, match="has no CT series"), pulled_study(orthanc.dicomweb, "1.2.3.999"):
        pass
    with pytest.raises(DicomWebError, match=r"127\.0\.0\.1:1/dicom-web: QIDO-RS .* failed"):
        find_series("http://127.0.0.1:1/dicom-web", "1.2.3")
