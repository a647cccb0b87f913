"""python -m viewer: the OHIF URL of a study in Orthanc, a screenshot of it, or the viewer installed.

    python -m viewer --install                       # make the viewer once; print the Orthanc config fragment
    python -m viewer --orthanc http://127.0.0.1:8042 # one OHIF URL per study in Orthanc
    python -m viewer --orthanc http://127.0.0.1:8042 --study UID [--screenshot out.png]

Orthanc must serve the viewer: merge `--install`'s JSON (viewer.ohif.orthanc_settings) into its
configuration beside the DICOMweb plugin (Root "/dicom-web/"). --screenshot opens the study in headless
Chromium with its SEG shown first, opens the segmentation panel and saves a PNG (viewer.ohif.capture).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from clinical.dicomweb import DicomWebError, find_series
from viewer import ohif

log = logging.getLogger("viewer")
DEFAULT_ORTHANC = "http://127.0.0.1:8042"


def _studies(orthanc: str, study_uid: str | None = None) -> list[str]:
    """Study Instance UIDs in Orthanc (QIDO-RS of its DICOMweb root), only `study_uid` if given.
    Raises DicomWebError."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    try:
        found = DICOMwebClient(url=orthanc.rstrip("/") + ohif.DICOMWEB_ROOT).search_for_studies(
            search_filters={"StudyInstanceUID": study_uid} if study_uid else None)
    except (requests.RequestException, ValueError) as exc:
        raise DicomWebError(f"{orthanc}: listing studies failed ({str(exc).splitlines()[0]}); check that Orthanc "
                            "is up there with its DICOMweb plugin at /dicom-web") from exc
    return [item["0020000D"]["Value"][0] for item in found if item.get("0020000D", {}).get("Value")]


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m viewer` (tests/test_docs.py parses the documented commands with it)."""
    parser = argparse.ArgumentParser(prog="python -m viewer", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orthanc", default=DEFAULT_ORTHANC, help=f"Orthanc's HTTP root (default {DEFAULT_ORTHANC})")
    parser.add_argument("--study", help="Study Instance UID to open (default: print a URL for every study)")
    parser.add_argument("--series", help="Series Instance UID to show first (default with --screenshot: the "
                                         "study's SEG)")
    parser.add_argument("--mount", default="viewer", help="URL folder Orthanc serves the viewer at (default viewer)")
    parser.add_argument("--mode", default="viewer", choices=ohif.MODES, help="OHIF mode (default viewer)")
    parser.add_argument("--screenshot", type=Path, help="open the study in headless Chromium and save a PNG here")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per stage of --screenshot (default 600)")
    parser.add_argument("--install", action="store_true", help="install the viewer into --cache and print the "
                                                               "Orthanc configuration fragment that serves it")
    parser.add_argument("--cache", type=Path, help="cache folder (default WHOLEBODY_CACHE or the repository's .cache)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        if args.install:
            from wholebody.triton_server.install import DEFAULT_CACHE

            dist = ohif.ensure_viewer(args.cache or DEFAULT_CACHE, mount=args.mount)
            print(json.dumps(ohif.orthanc_settings(dist, mount=args.mount), indent=2))
            return 0
        if args.study is None:
            if args.screenshot:
                parser.error("--screenshot needs --study")
            for study in _studies(args.orthanc):
                print(ohif.study_url(args.orthanc, study, mount=args.mount, mode=args.mode))
            return 0
        dicomweb = args.orthanc.rstrip("/") + ohif.DICOMWEB_ROOT
        if not _studies(args.orthanc, args.study):
            print(f"error: study {args.study} is not in Orthanc at {args.orthanc}; store it there first "
                  "(python -m client ... --dicomweb, or storescu)", file=sys.stderr)
            return 1
        series = args.series
        if args.screenshot and series is None:
            segs = find_series(dicomweb, args.study, modality="SEG")
            if not segs:
                print(f"error: study {args.study} has no SEG in Orthanc at {args.orthanc}: segment it first, "
                      "or name a series with --series", file=sys.stderr)
                return 1
            series = next(iter(segs))
        url = ohif.study_url(args.orthanc, args.study, mount=args.mount, mode=args.mode, series_uid=series)
        print(url)
        if args.screenshot:
            rows = ohif.capture(url, args.screenshot, timeout_s=args.timeout_s)
            print(f"{args.screenshot}: {sum(1 for name, _ in rows if name != 'Background')} segments in "
                  "OHIF's segmentation panel")
        return 0
    except (ohif.ViewerError, DicomWebError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:  # viewer.chromium.BrowserError
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
