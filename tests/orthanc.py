"""A real Orthanc PACS (Debian packages orthanc + orthanc-dicomweb) for the tests, on a free loopback port.

Its own temporary storage and configuration, the DICOMweb plugin enabled, remote access refused
(Orthanc 1.10 has no bind-address option: `RemoteAccessAllowed: false` answers only loopback clients),
no DICOM (DIMSE) port. Stopped, with its process group, and its storage removed on exit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import requests

from router.orthanc import merge_config
from wholebody.triton_server.ports import free_port
from wholebody.triton_server.processes import stop_process_group

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INSTALL_HINT = "run `make clinical-tools` (Debian packages orthanc, orthanc-dicomweb)"


class LocalOrthanc:
    """`with LocalOrthanc() as pacs:` -> pacs.url (REST), pacs.dicomweb (DICOMweb root).

    extra_config: merged into the configuration (router.orthanc.merge_config), e.g. viewer.orthanc_settings(dist) to serve
    the OHIF viewer with the ServeFolders plugin.
    """

    def __init__(self, start_timeout_s: float = 60.0, extra_config: dict | None = None) -> None:
        for path in (ORTHANC, DICOMWEB_PLUGIN):
            if not Path(path).exists():
                raise RuntimeError(f"{path} is missing: {INSTALL_HINT}")
        self.start_timeout_s = start_timeout_s
        self.extra_config = extra_config or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.workdir: Path | None = None
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> LocalOrthanc:
        self.workdir = Path(tempfile.mkdtemp(prefix="orthanc-"))
        try:
            config = {
                "Name": "wholebody-test", "StorageDirectory": str(self.workdir / "storage"),
                "IndexDirectory": str(self.workdir / "storage"), "HttpPort": self.port,
                "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomServerEnabled": False,
                "HttpThreadsCount": 4, "ConcurrentJobs": 1, "SaveJobs": False,
                "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            }
            (self.workdir / "orthanc.json").write_text(json.dumps(merge_config(config, self.extra_config)))
            self.log = open(self.workdir / "orthanc.log", "wb")
            self.process = subprocess.Popen([ORTHANC, str(self.workdir / "orthanc.json")], stdout=self.log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + self.start_timeout_s
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self._log_tail()}")
                try:
                    if requests.get(f"{self.url}/system", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not answer within {self.start_timeout_s} s: {self._log_tail()}")
                time.sleep(0.2)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _log_tail(self) -> str:
        return (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:]

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            stop_process_group(self.process)
        if getattr(self, "log", None) is not None:
            self.log.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
