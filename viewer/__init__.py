"""The OHIF viewer served by Orthanc (ServeFolders) next to its DICOMweb: see viewer/ohif.py and docs/viewer.md.

    from viewer import ensure_viewer, orthanc_settings, study_url
    dist = ensure_viewer(cache)                  # <cache>/ohif/<key>/dist, made once (npm pack @ohif/app)
    config = merge(config, orthanc_settings(dist))   # Orthanc serves it at /viewer/
    study_url("http://127.0.0.1:8042", study_uid)    # the page that opens the study
"""

from viewer.ohif import ViewerError, capture, ensure_viewer, orthanc_settings, study_url

__all__ = ["ViewerError", "capture", "ensure_viewer", "orthanc_settings", "study_url"]
