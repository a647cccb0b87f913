"""A real Orthanc PACS (Debian packages orthanc + orthanc-dicomweb) for the tests, on a free loopback port.

The router's own launcher (router.orthanc.OrthancNode), so the tests start Orthanc exactly as the product
does: its own temporary storage and configuration, the DICOMweb plugin enabled, remote access refused
(Orthanc 1.10 has no bind-address option: `RemoteAccessAllowed: false` answers only loopback clients).
Here without a DICOM (DIMSE) port and without senders. Stopped, with its process group, and its storage
removed on exit.
"""

from __future__ import annotations

from typing import Any

from router.orthanc import OrthancNode, merge_config


def local_orthanc(start_timeout_s: float = 60.0, extra_config: dict[str, Any] | None = None) -> OrthancNode:
    """`with local_orthanc() as pacs:` -> pacs.url (REST), pacs.dicomweb (DICOMweb root).

    extra_config: merged into the configuration (router.orthanc.merge_config), e.g.
    viewer.orthanc_settings(dist) to serve the OHIF viewer with the ServeFolders plugin.
    Raises RuntimeError naming `make clinical-tools` when Orthanc is not installed.
    """
    return OrthancNode(name="wholebody-test", senders={}, start_timeout_s=start_timeout_s,
                       extra=merge_config({"DicomServerEnabled": False}, extra_config or {}))
