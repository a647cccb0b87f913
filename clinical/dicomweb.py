"""A PACS over DICOMweb, with dicomweb-client: find and pull CT series (QIDO-RS, WADO-RS), store SEGs (STOW-RS).

Series are pulled into a folder as one Part-10 file per instance (`<SOPInstanceUID>.dcm`), ready for
`clinical.dicom_series.read_ct_series`; `pulled_study` does it in a temporary folder removed afterwards.
`url` is the server's DICOMweb root, e.g. http://localhost:8042/dicom-web for Orthanc's plugin.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient

log = logging.getLogger(__name__)

TAG_SERIES_UID = "0020000E"
TAG_MODALITY = "00080060"
TAG_NUMBER_OF_INSTANCES = "00201209"
# dicomweb-client retries a failed request (any exception, and HTTP 408/429/503/504) with exponential
# back-off; its default (5 attempts, 2+4+8+16 s) makes a wrong URL take 30 s to report
HTTP_ATTEMPTS = 3
RETRY_WAIT_MULTIPLIER_MS = 500  # waits 1 s, then 2 s


class DicomWebError(RuntimeError):
    """A DICOMweb request that failed; the message is one line naming the server, the request and the fix."""


def _client(url: str, session: requests.Session | None) -> DICOMwebClient:
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    client.set_http_retry_params(max_attempts=HTTP_ATTEMPTS, wait_exponential_multiplier=RETRY_WAIT_MULTIPLIER_MS)
    return client


def _fail(url: str, what: str, exc: Exception) -> DicomWebError:
    return DicomWebError(f"{url}: {what} failed ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                         "check the DICOMweb URL, that the server is up and that the study exists")


def _value(item: dict, tag: str) -> str | None:
    values = item.get(tag, {}).get("Value")
    return str(values[0]) if values else None


def find_series(url: str, study_uid: str, modality: str | None = "CT",
                session: requests.Session | None = None) -> dict[str, int]:
    """QIDO-RS: SeriesInstanceUID -> number of instances, for the study's series of `modality` (None: all)."""
    filters = {"Modality": modality} if modality else None
    try:
        found = _client(url, session).search_for_series(study_uid, search_filters=filters,
                                                        fields=["NumberOfSeriesRelatedInstances"])
    except (requests.RequestException, ValueError) as exc:
        raise _fail(url, f"QIDO-RS search for the series of study {study_uid}", exc) from exc
    out = {}
    for item in found:
        if modality and _value(item, TAG_MODALITY) not in (None, modality):
            continue  # some servers ignore the filter
        out[_value(item, TAG_SERIES_UID)] = int(_value(item, TAG_NUMBER_OF_INSTANCES) or 0)
    return out


def pull_series(url: str, study_uid: str, series_uid: str, folder: str | Path,
                session: requests.Session | None = None) -> list[Path]:
    """WADO-RS: write every instance of one series into `folder` as <SOPInstanceUID>.dcm; returns the files.

    Instances come in the transfer syntax the server stores (compressed ones are decoded on reading).
    Raises DicomWebError on a failed request or an empty series.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for ds in _client(url, session).iter_series(study_uid, series_uid):
            path = folder / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    except (requests.RequestException, ValueError) as exc:
        raise _fail(url, f"WADO-RS retrieval of series {series_uid}", exc) from exc
    if not paths:
        raise DicomWebError(f"{url}: series {series_uid} of study {study_uid} has no instances; check the UIDs")
    log.info("pulled %d instances of series %s from %s", len(paths), series_uid, url)
    return paths


@contextmanager
def pulled_study(url: str, study_uid: str, series_uid: str | None = None, modality: str = "CT",
                 session: requests.Session | None = None) -> Iterator[Path]:
    """Pull the study's `modality` series (or the one `series_uid`) into a temporary folder, one sub-folder
    per series, and remove the folder on exit, also after an error. Raises DicomWebError when the study
    has no such series."""
    uids = [series_uid] if series_uid else list(find_series(url, study_uid, modality, session))
    if not uids:
        raise DicomWebError(f"{url}: study {study_uid} has no {modality} series; check the study UID")
    folder = Path(tempfile.mkdtemp(prefix="dicomweb-"))
    try:
        for uid in uids:
            pull_series(url, study_uid, uid, folder / uid, session)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def store(url: str, paths: Sequence[str | Path], session: requests.Session | None = None) -> None:
    """STOW-RS: store DICOM files (e.g. a DICOM-SEG) on the server. Raises DicomWebError when refused."""
    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        response = _client(url, session).store_instances(datasets)
    except (requests.RequestException, ValueError) as exc:
        raise _fail(url, f"STOW-RS of {len(datasets)} instance(s)", exc) from exc
    failed = response.get("00081198", {}).get("Value") if response else None  # FailedSOPSequence
    if failed:
        raise DicomWebError(f"{url}: STOW-RS refused {len(failed)} of {len(datasets)} instance(s); see the server log")
    log.info("stored %d instance(s) on %s", len(datasets), url)
