"""python -m router: the DICOM node's router (issue 18): Orthanc receives, the router segments and forwards.

  python -m router run --orthanc http://127.0.0.1:8042 -u localhost:8001 -u gpu2:8001 --pacs pacs \\
      --rules rules.yaml --state-dir /var/lib/wholebody-router
  python -m router status --state-dir /var/lib/wholebody-router          # table (or --json)
  python -m router retry 3f2a9c1e --state-dir ...                         # queue a final series again (ID prefix)
  python -m router stack --model-repository model_repository              # Triton + Orthanc + router, loopback
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
import sys
from pathlib import Path

from clinical.quality import QualityPolicy
from clinical.seg_encodings import ENCODINGS
from router.orthanc import DOWNLOAD_WORKERS, Modality
from router.rules import RulesError, load_rules
from router.service import Router, RouterConfig, status_table
from router.state import StateStore

log = logging.getLogger("router")
DEFAULT_STATE_DIR = Path("router-state")


def _router_flags(parser: argparse.ArgumentParser, stack: bool) -> None:
    if not stack:
        parser.add_argument("--orthanc", default="http://127.0.0.1:8042", metavar="URL",
                            help="Orthanc's REST API (default %(default)s)")
        parser.add_argument("-u", "--url", action="append", metavar="HOST:PORT",
                            help="a Triton gRPC endpoint; repeat for several servers (default localhost:8001)")
        parser.add_argument("--pacs", metavar="NAME", help="forward results to this Orthanc modality (DicomModalities)")
        parser.add_argument("--orthanc-user", metavar="NAME",
                            help="Orthanc RegisteredUsers name; the password is read from $ORTHANC_PASSWORD")
        parser.add_argument("--status-port", type=int, metavar="PORT",
                            help="serve GET /status and /healthz on this port (0: any free; default: none)")
        parser.add_argument("--status-address", default="127.0.0.1",
                            help="the endpoint's address (default %(default)s)")
        parser.add_argument("--start-at-end", action="store_true",
                            help="with a fresh state, skip the series Orthanc already holds")
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="the router's SQLite state and status.json (default ./%(default)s)")
    parser.add_argument("--rules", type=Path, metavar="FILE", help="the site's rules, YAML or JSON (default: axial CT)")
    parser.add_argument("--workers-per-server", type=int, default=1, metavar="N",
                        help="series in flight per Triton server (default %(default)s)")
    parser.add_argument("--resolution", choices=("highres", "lowres"), help="default: the server's")
    parser.add_argument("--seg-encoding", choices=tuple(ENCODINGS), metavar="ENCODING",
                        help=f"DICOM-SEG encoding, one of {', '.join(ENCODINGS)} (default binary: Orthanc 1.10 "
                             "forwards it)")
    parser.add_argument("--download-workers", type=int, default=DOWNLOAD_WORKERS, metavar="N",
                        help="parallel instance fetches from Orthanc per series (default %(default)s)")
    parser.add_argument("--max-attempts", type=int, default=4, help="tries per series (default %(default)s)")
    parser.add_argument("--backoff-seconds", type=float, default=30.0,
                        help="wait after the first failed try, doubled after each (default %(default)s)")
    parser.add_argument("--backoff-cap-seconds", type=float, default=900.0, help="longest wait (default %(default)s)")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="changes feed polling (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="bound on one segmentation request, s (default %(default)s)")
    parser.add_argument("--quality-policy", metavar="CHECK=ACTION,...",
                        help="what a failed quality check does: hold (stored in Orthanc, not forwarded), mark or "
                             "report, e.g. laterality=hold,volume=report (default: clinical.quality.DEFAULT_ACTIONS;"
                             " docs/quality-and-reports.md)")
    parser.add_argument("--no-quality-checks", action="store_true",
                        help="no checks on the results (nothing is held back)")
    parser.add_argument("--no-sr", action="store_true", help="no TID 1500 Structured Report beside each SEG")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _router_flags(sub.add_parser("run", help="watch Orthanc and segment the series the rules take"), stack=False)
    status = sub.add_parser("status", help="each series' outcome")
    status.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help="the router's --state-dir (default ./%(default)s)")
    status.add_argument("--json", action="store_true",
                        help="the JSON the router writes to status.json, with each series' full Orthanc ID")
    status.add_argument("--status", choices=("queued", "running", "done", "held", "failed", "ignored"),
                        help="only the series in this state (default: all)")
    retry = sub.add_parser("retry", help="queue a done/held/failed/ignored series again (attempts reset)")
    retry.add_argument("orthanc_ids", nargs="+", metavar="ORTHANC_SERIES_ID",
                       help="Orthanc's series ID or a prefix of it that names one series (`status` shows the "
                            "first 8 characters in brackets, `status --json` the whole ID as orthanc_id)")
    retry.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                       help="the router's --state-dir (default ./%(default)s)")
    stack = sub.add_parser("stack", help="Triton + Orthanc + router on loopback; Ctrl-C stops all")
    _router_flags(stack, stack=True)
    stack.add_argument("--model-repository", type=Path, help="default: the project's model_repository/")
    stack.add_argument("-u", "--url", metavar="HOST:PORT", help="use this running Triton instead of starting one")
    stack.add_argument("--dicom-port", type=int, default=4242,
                       help="Orthanc's DICOM (C-STORE) port (default %(default)s)")
    stack.add_argument("--http-port", type=int, default=8042,
                       help="Orthanc's REST, DICOMweb and viewer port (default %(default)s)")
    stack.add_argument("--aet", default="WHOLEBODY", help="Orthanc's AE title (default %(default)s)")
    stack.add_argument("--sender-aet", default="STORESCU", help="AE title allowed to C-STORE from loopback")
    stack.add_argument("--stable-age", type=int, default=10, help="Orthanc's StableAge, s (default %(default)s)")
    stack.add_argument("--pacs", metavar="AET@HOST:PORT", help="forward results to this DICOM node")
    stack.add_argument("--no-viewer", action="store_true",
                       help="do not serve the OHIF viewer at <Orthanc>/viewer/ (docs/viewer.md; its first start "
                            "fetches @ohif/app from the npm registry)")
    return parser


def _config(args: argparse.Namespace, orthanc: str, urls: list[str]) -> RouterConfig:
    return RouterConfig(
        orthanc_url=orthanc, triton_urls=urls, state_dir=args.state_dir, rules=load_rules(args.rules),
        workers_per_server=args.workers_per_server, pacs=getattr(args, "pacs", None), poll_s=args.poll_seconds,
        max_attempts=args.max_attempts, backoff_base_s=args.backoff_seconds, backoff_cap_s=args.backoff_cap_seconds,
        resolution=args.resolution, request_timeout_s=args.timeout, seg_encoding=args.seg_encoding,
        start_at_end=getattr(args, "start_at_end", False), orthanc_auth=_auth(getattr(args, "orthanc_user", None)),
        status_port=getattr(args, "status_port", None), status_address=getattr(args, "status_address", "127.0.0.1"),
        quality_policy=None if args.quality_policy is None else QualityPolicy.parse(args.quality_policy),
        quality_checks=not args.no_quality_checks, structured_report=not args.no_sr,
        download_workers=args.download_workers)


def _auth(user: str | None) -> tuple[str, str] | None:
    if user is None:
        return None
    password = os.environ.get("ORTHANC_PASSWORD")
    if not password:
        raise ValueError(f"--orthanc-user {user}: set ORTHANC_PASSWORD to that user's password")
    return user, password


def _parse_node(text: str) -> Modality:
    aet, _, rest = text.partition("@")
    host, _, port = rest.rpartition(":")
    if not aet or not host or not port.isdigit():
        raise ValueError(f"--pacs {text!r}: write AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
    return Modality(aet, host, int(port))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("highdicom", "urllib3"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        if args.command in ("status", "retry") and not (args.state_dir / "router.sqlite").exists():
            # not made here: a mistyped --state-dir would otherwise get an empty state (and retry say "unknown")
            log.error("%s: no router state here; pass the router's --state-dir", args.state_dir)
            return 2
        if args.command == "status":
            with StateStore(args.state_dir / "router.sqlite") as store:
                rows = store.rows(args.status)
                if args.json:
                    print(json.dumps({"counts": store.counts(), "series": [r.as_dict() for r in rows]}, indent=1))
                else:
                    print(status_table(rows))
                    print(", ".join(f"{n} {s}" for s, n in store.counts().items()))
            return 0
        if args.command == "retry":
            with StateStore(args.state_dir / "router.sqlite") as store:
                errors = 0
                for given in args.orthanc_ids:
                    try:
                        orthanc_id = store.resolve(given)
                    except LookupError as exc:
                        log.error("%s", exc)
                        errors += 1
                        continue
                    if not store.requeue(orthanc_id):
                        status = next((r.status for r in store.rows() if r.orthanc_id == orthanc_id), "?")
                        log.error("%s: %s, not done/held/failed/ignored: the router has it already", orthanc_id,
                                  status)
                        errors += 1
                    else:
                        log.info("%s: queued again", orthanc_id)
            return 1 if errors else 0
        if args.command == "run":
            signal.signal(signal.SIGTERM, _interrupt)  # systemd / Kubernetes stop: as Ctrl-C
            router = Router(_config(args, args.orthanc, args.url or ["localhost:8001"]))
            try:
                router.run()
            except KeyboardInterrupt:
                pass
            return 0
        from router.stack import StackOptions, run_stack
        from wholebody.triton_server import DEFAULT_CACHE

        options = StackOptions(
            state_dir=args.state_dir, router=_config(args, "", []), dicom_port=args.dicom_port,
            http_port=args.http_port, aet=args.aet, sender_aet=args.sender_aet, stable_age_s=args.stable_age,
            pacs=_parse_node(args.pacs) if args.pacs else None, model_repository=args.model_repository,
            triton_url=args.url, viewer_cache=None if args.no_viewer else DEFAULT_CACHE)
        return run_stack(options)
    except (RulesError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    except RuntimeError as exc:  # a part of the stack that did not start (the viewer, Orthanc, Triton)
        log.error("%s", exc)
        return 1
    except sqlite3.Error as exc:
        log.error("%s: router state unusable (%s); move it away to start afresh", args.state_dir, exc)
        return 2
    except OSError as exc:  # e.g. --state-dir is a file or not writable, or --status-port is taken
        log.error("%s: %s; give a writable --state-dir and a free --status-port", exc.filename or args.state_dir,
                  exc.strerror or exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
