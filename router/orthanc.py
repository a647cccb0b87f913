"""Orthanc for the router: a launcher of the Debian package (the node that receives C-STORE) and a small
REST client of the calls the router makes.

`OrthancNode` starts `/usr/sbin/Orthanc` (Debian `orthanc` 1.10 + `orthanc-dicomweb`) with its own
configuration: HTTP on loopback (`RemoteAccessAllowed: false`: Orthanc 1.10 has no bind address, so
only loopback clients are answered), a DICOM port, the DICOMweb plugin, `StableAge` (seconds without a
new instance before a series is "stable"), the PACS to forward to (`DicomModalities`), and the user
metadata the router writes on a series. Orthanc 1.10's DICOM port listens on every interface; the
launcher therefore accepts C-STORE only from the modalities it is given, checked by AE title and host
(`DicomAlwaysAllowStore: false`, `DicomCheckModalityHost: true`): by default one modality, any AE title
``STORESCU`` at 127.0.0.1. Its process group is stopped on exit; its storage is kept unless it was a
temporary one (a received study is never deleted by the router).

`OrthancClient` wraps the REST API (requests): the changes feed, a series' tags, its archive, storing an
instance, C-STORE to a modality, series metadata. Every failure is an `OrthancError` naming the URL.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from router.rules import SeriesFacts
from wholebody.atomic import atomic_write
from wholebody.triton_server.ports import free_port
from wholebody.triton_server.processes import stop_process_group

log = logging.getLogger(__name__)

ORTHANC = "/usr/sbin/Orthanc"
PLUGINS = "/usr/share/orthanc/plugins"
DICOMWEB_PLUGIN = f"{PLUGINS}/libOrthancDicomWeb.so"
INSTALL_HINT = "run `make clinical-tools` (Debian packages orthanc, orthanc-dicomweb)"
# user metadata on a series: the router's outcome (done/held/failed/...), for an operator in Orthanc Explorer
STATUS_METADATA = "WholebodyRouterStatus"
STATUS_METADATA_INDEX = 4242  # user metadata indices are 1024..65535
# parallel fetches of a series' instances (perf/router_download.py: a 512x512x397 CT on the 2-core box);
# Orthanc answers with HttpThreadsCount threads (8 in OrthancNode's config, 50 by default)
DOWNLOAD_WORKERS = 4
DOWNLOAD_ATTEMPTS = 3  # tries of one instance's GET (connection errors, timeouts, HTTP 5xx)
# requests asks for gzip/deflate by default and Orthanc (HttpCompressionEnabled, true by default) then deflates
# each file on the fly: 28 ms per 0.5 MB CT slice against 1.3 ms uncompressed on loopback (measured on the
# 2-core box, a 512x512 slice, one session); the instances are fetched as they are stored
NO_HTTP_COMPRESSION = {"Accept-Encoding": "identity"}


class OrthancError(RuntimeError):
    """An Orthanc REST call that failed; the message names the URL and what to check."""


@dataclass
class Modality:
    """A DICOM node Orthanc knows: a PACS to forward to, or a modality allowed to send."""

    aet: str
    host: str
    port: int

    def as_config(self) -> list[object]:
        return [self.aet, self.host, self.port]


def merge_config(config: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`config` with `extra` merged in: nested objects merged key by key, lists (e.g. "Plugins") extended
    with the items they lack, other values replaced. Neither argument is changed."""
    out = dict(config)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_config(out[key], value)
        elif isinstance(value, list) and isinstance(out.get(key), list):
            out[key] = out[key] + [v for v in value if v not in out[key]]
        else:
            out[key] = value
    return out


@dataclass
class OrthancNode:
    """`with OrthancNode(...) as node:` -> node.url (REST), node.dicomweb, node.dicom_port, node.aet.

    http_port/dicom_port 0: free ports. storage None: a temporary folder removed on exit; a path: kept.
    senders: modalities allowed to C-STORE (default: AE title STORESCU from 127.0.0.1). pacs: modalities
    by name the router may forward to (`/modalities/{name}/store`). extra: more Orthanc configuration keys
    (they win). Raises RuntimeError (with the log's tail) when Orthanc is missing or does not start.
    """

    name: str = "wholebody-router"
    aet: str = "WHOLEBODY"
    http_port: int = 0
    dicom_port: int = 0
    storage: Path | None = None
    stable_age_s: int = 60
    senders: dict[str, Modality] = field(default_factory=lambda: {"scanner": Modality("STORESCU", "127.0.0.1", 104)})
    pacs: dict[str, Modality] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    start_timeout_s: float = 60.0
    process: subprocess.Popen[bytes] | None = None
    _temporary: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        """The Orthanc configuration this node runs with (JSON-able)."""
        assert self.storage is not None
        modalities = {name: m.as_config() for name, m in {**self.senders, **self.pacs}.items()}
        config: dict[str, Any] = {
            "Name": self.name, "StorageDirectory": str(self.storage), "IndexDirectory": str(self.storage),
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomServerEnabled": True, "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True,
            "DicomModalities": modalities, "StableAge": self.stable_age_s,
            "HttpThreadsCount": 8, "ConcurrentJobs": 2, "SaveJobs": False, "OverwriteInstances": False,
            "UserMetadata": {STATUS_METADATA: STATUS_METADATA_INDEX},
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        return merge_config(config, self.extra)

    def __enter__(self) -> OrthancNode:
        for path in (ORTHANC, DICOMWEB_PLUGIN):
            if not Path(path).exists():
                raise RuntimeError(f"{path} is missing: {INSTALL_HINT}")
        self.http_port = self.http_port or free_port()
        self.dicom_port = self.dicom_port or free_port()
        if self.storage is None:
            self._temporary = Path(tempfile.mkdtemp(prefix="orthanc-"))
            self.storage = self._temporary / "storage"
        self.storage.mkdir(parents=True, exist_ok=True)
        config_path = self.storage.parent / f"{self.name}.orthanc.json"
        config_path.write_text(json.dumps(self.config(), indent=1))
        self.log_path = self.storage.parent / f"{self.name}.orthanc.log"
        self._log = open(self.log_path, "ab")
        try:
            self.process = subprocess.Popen([ORTHANC, str(config_path)], stdout=self._log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
            deadline = time.monotonic() + self.start_timeout_s
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}")
                try:
                    if requests.get(f"{self.url}/system", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not answer within {self.start_timeout_s} s: {self.log_tail()}")
                time.sleep(0.2)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        """SIGTERM Orthanc's process group, SIGKILL after 20 s."""
        if self.process is not None:
            stop_process_group(self.process)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)


def _copy_body(response: requests.Response, out: BinaryIO) -> None:
    for chunk in response.iter_content(chunk_size=1 << 20):
        out.write(chunk)


def _floats(value: object) -> tuple[float, ...] | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return tuple(float(v) for v in value.split("\\"))
    except ValueError:
        return None


class OrthancClient:
    """The REST calls of the router. One instance per thread (a requests.Session each)."""

    def __init__(self, url: str, timeout_s: float = 60.0, auth: tuple[str, str] | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        # an idle keep-alive connection that Orthanc closed just as the next poll reuses it ("Connection aborted",
        # RemoteDisconnected) is tried once more on a fresh connection; only idempotent methods (urllib3's default
        # allowed_methods leave POST out), so a store or a forward is never sent twice by the transport
        retry = Retry(total=1, connect=1, read=1, status=0, backoff_factor=0, raise_on_status=False)
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        if auth:
            self.session.auth = auth

    def close(self) -> None:
        self.session.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = f"{self.url}{path}"
        try:
            response = self.session.request(method, url, timeout=kwargs.pop("timeout", self.timeout_s), **kwargs)
        except requests.RequestException as exc:
            raise OrthancError(f"{method} {url}: {exc.__class__.__name__}: {exc}; is Orthanc running there?") from None
        if not response.ok:
            raise OrthancError(f"{method} {url}: HTTP {response.status_code} {response.text[:200].strip()}")
        return response

    def get_json(self, path: str) -> Any:
        return self._call("GET", path).json()

    def changes(self, since: int, limit: int = 100) -> tuple[list[dict[str, Any]], int, bool]:
        """One page of the changes feed after `since`: (changes, last seq, done)."""
        page = self.get_json(f"/changes?since={since}&limit={limit}")
        return list(page.get("Changes", [])), int(page.get("Last", since)), bool(page.get("Done", True))

    def last_change(self) -> int:
        """The sequence number of the newest change (`/changes?last`)."""
        return int(self.get_json("/changes?last").get("Last", 0))

    def series(self, series_id: str) -> dict[str, Any]:
        return self.get_json(f"/series/{series_id}")

    def series_facts(self, series_id: str) -> tuple[SeriesFacts, dict[str, Any]]:
        """What the rules look at (one series, one of its instances' tags) and the series' JSON."""
        info = self.series(series_id)
        main = info.get("MainDicomTags", {})
        instances = info.get("Instances", [])
        tags: dict[str, Any] = self.get_json(f"/instances/{instances[0]}/simplified-tags") if instances else {}
        thickness = _floats(tags.get("SliceThickness"))
        image_type = tags.get("ImageType", "")
        facts = SeriesFacts(
            modality=str(main.get("Modality", tags.get("Modality", ""))),
            description=str(main.get("SeriesDescription", tags.get("SeriesDescription", ""))),
            body_part=str(main.get("BodyPartExamined", tags.get("BodyPartExamined", ""))),
            slice_thickness_mm=thickness[0] if thickness else None,
            slices=len(instances),
            orientation=_floats(tags.get("ImageOrientationPatient")),
            image_type=tuple(image_type.split("\\")) if isinstance(image_type, str) and image_type else (),
        )
        return facts, info

    def series_uids(self, info: dict[str, Any]) -> tuple[str, str]:
        """(SeriesInstanceUID, StudyInstanceUID) of a series JSON (the study's from its parent)."""
        series_uid = str(info.get("MainDicomTags", {}).get("SeriesInstanceUID", ""))
        study = self.get_json(f"/studies/{info['ParentStudy']}") if info.get("ParentStudy") else {}
        return series_uid, str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))

    def download_series(self, series_id: str, target: Path) -> Path:
        """The series' instances as a .zip (`/series/{id}/archive`), streamed to `target`.

        Orthanc deflates the archive on the fly: 20-45 s for a 512x512x397 CT on a loaded 2-core box
        (docs/hospital-flow.md); the router fetches the instances instead (`download_instances`)."""
        url = f"/series/{series_id}/archive"
        response = self._call("GET", url, stream=True, timeout=max(self.timeout_s, 600.0))
        with open(target, "wb") as out:
            for chunk in response.iter_content(chunk_size=1 << 20):
                out.write(chunk)
        return target

    def download_instances(self, series_id: str, folder: Path, workers: int = DOWNLOAD_WORKERS,
                           attempts: int = DOWNLOAD_ATTEMPTS) -> list[Path]:
        """Every instance of a series as its own DICOM file in `folder` (`<instance ID>.dcm`), fetched in
        parallel (`/instances/{id}/file`, without HTTP compression: `NO_HTTP_COMPRESSION`) by `workers`
        threads, each with its own requests.Session. Each file is written atomically (wholebody.atomic):
        `folder` never holds half a file.

        A fetch that fails with a connection error, a timeout or an HTTP 5xx is tried again (a GET changes
        nothing) up to `attempts` times in all; then, or at once on another HTTP error (a 404: the instance
        was deleted meanwhile), the first error is raised and the fetches not yet begun are cancelled.
        Returns the files, one per instance of the series' list (their number is checked against it). On a
        failure the complete files already written stay in `folder` (the router's worker removes its folder).

        Raises OrthancError naming the instance and what to check; ValueError for workers or attempts < 1.
        """
        if workers < 1 or attempts < 1:
            raise ValueError(f"download workers and attempts must be at least 1, not {workers} and {attempts}")
        instances = [str(i) for i in self.series(series_id).get("Instances", [])]
        if not instances:
            raise OrthancError(f"GET {self.url}/series/{series_id}: the series lists no instances")
        local = threading.local()
        sessions: list[requests.Session] = []
        sessions_lock = threading.Lock()

        def session() -> requests.Session:
            if getattr(local, "session", None) is None:
                local.session = requests.Session()
                local.session.auth = self.session.auth
                with sessions_lock:
                    sessions.append(local.session)
            return local.session  # type: ignore[no-any-return]

        def fetch(instance_id: str) -> Path:
            url = f"{self.url}/instances/{instance_id}/file"
            target = folder / f"{instance_id}.dcm"
            for attempt in range(1, attempts + 1):
                try:
                    response = session().get(url, stream=True, timeout=self.timeout_s,
                                             headers=NO_HTTP_COMPRESSION)
                    with response:
                        if response.status_code >= 500 and attempt < attempts:
                            raise requests.HTTPError(f"HTTP {response.status_code}")
                        if not response.ok:
                            tried = f" (tried {attempts} times)" if response.status_code >= 500 else ""
                            raise OrthancError(f"GET {url}: HTTP {response.status_code} "
                                               f"{response.text[:200].strip()}{tried}")
                        atomic_write(target, lambda out: _copy_body(response, out))
                    return target
                except requests.RequestException as exc:
                    if attempt == attempts:
                        raise OrthancError(f"GET {url}: {exc.__class__.__name__}: {exc} (tried {attempts} times); "
                                           "is Orthanc running there?") from None
                    log.debug("GET %s: %s; trying again (%d/%d)", url, exc, attempt + 1, attempts)
                    time.sleep(0.2 * attempt)
            raise AssertionError("unreachable")

        pool = ThreadPoolExecutor(max_workers=min(workers, len(instances)), thread_name_prefix="orthanc-download")
        try:
            files = list(pool.map(fetch, instances))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for s in sessions:
                s.close()
        written = {p.name for p in folder.glob("*.dcm")} & {p.name for p in files}
        if len(written) != len(instances):  # one file per instance listed, none lost or written twice
            raise OrthancError(f"series {series_id}: {len(written)} files for the {len(instances)} instances "
                               f"Orthanc lists, in {folder}")
        return files

    def store_instance(self, path: Path) -> dict[str, Any]:
        """POST /instances: store one DICOM file. Returns Orthanc's answer (ID, Status: Success/AlreadyStored)."""
        return self._call("POST", "/instances", data=path.read_bytes(),
                          headers={"Content-Type": "application/dicom"}).json()

    def forward(self, modality: str, instance_ids: list[str]) -> None:
        """C-STORE instances to a modality Orthanc knows (`/modalities/{name}/store`, synchronous)."""
        self._call("POST", f"/modalities/{modality}/store",
                   json={"Resources": instance_ids, "Synchronous": True}, timeout=max(self.timeout_s, 600.0))

    def set_status(self, series_id: str, status: str) -> bool:
        """Write the router's outcome as the series' user metadata; False when this Orthanc does not
        declare it (a site's own Orthanc without `UserMetadata`), which is not an error."""
        try:
            self._call("PUT", f"/series/{series_id}/metadata/{STATUS_METADATA}", data=status.encode())
            return True
        except OrthancError as exc:
            log.debug("series %s: status metadata not written (%s)", series_id, exc)
            return False
