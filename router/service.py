"""The router service: watches Orthanc's changes feed for stable series, records the ones the rules take,
and segments them with bounded concurrency through one or several Triton servers.

Threads: one poller (the changes feed -> the state store) and `workers_per_server` workers per Triton
URL (each holds its own SegmentationClient, Orthanc client and SQLite connection). A worker's series:
download the series' instances from Orthanc (`OrthancClient.download_instances`, `download_workers` fetches
in parallel) -> read them (clinical.dicom_series) -> segment the volume (Triton) ->
`router.results.results_for` (the DICOM-SEG, the quality checks, the SR) -> store the files in Orthanc
(REST POST /instances) -> forward them to the PACS (Orthanc's C-STORE, `/modalities/{pacs}/store`)
-> record the outcome (state store, `status.json`, Orthanc series metadata).

Failures: a scan that cannot be read or segmented as it is (DicomInputError, DicomSegError, a refused
volume) fails at once; anything else (Triton or Orthanc unreachable, a timeout) is tried again after
`backoff_s(attempt)` up to `max_attempts`. The router never deletes anything in Orthanc.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

from router.orthanc import DOWNLOAD_WORKERS, OrthancClient, OrthancError
from router.rules import Rules, decide
from router.state import FINAL, NewSeries, SeriesRow, StateStore, backoff_s
from wholebody.atomic import atomic_write

if TYPE_CHECKING:
    from clinical.quality import QualityPolicy

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
STATE_FILE = "router.sqlite"


@dataclass
class RouterConfig:
    """How the router runs (the CLI's flags; `python -m router run --help` says each one's default)."""

    orthanc_url: str
    triton_urls: list[str]
    state_dir: Path
    rules: Rules = field(default_factory=Rules)
    workers_per_server: int = 1
    pacs: str | None = None  # an Orthanc modality name (DicomModalities) to forward results to
    poll_s: float = 1.0
    max_attempts: int = 4
    backoff_base_s: float = 30.0
    backoff_cap_s: float = 900.0
    resolution: str | None = None  # None: the server's default
    request_timeout_s: float | None = 3600.0
    seg_encoding: str | None = None  # None: router.results.ROUTER_ENCODING (binary: what Orthanc 1.10 forwards)
    start_at_end: bool = False  # a fresh state starts at Orthanc's newest change (skip what it already holds)
    orthanc_auth: tuple[str, str] | None = None  # HTTP basic credentials of Orthanc's RegisteredUsers
    status_address: str = "127.0.0.1"
    status_port: int | None = None  # GET /status (status.json's content) and /healthz; None: no endpoint
    quality_policy: QualityPolicy | None = None  # None: clinical.quality.DEFAULT_ACTIONS
    quality_checks: bool = True  # check every result (quality/<series UID>.json; "hold" keeps it from the PACS)
    structured_report: bool = True  # a TID 1500 SR beside each SEG (clinical.structured_report)
    download_workers: int = DOWNLOAD_WORKERS  # parallel instance fetches per series (router.orthanc)

    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def status_path(self) -> Path:
        return self.state_dir / STATUS_FILE

    @property
    def quality_dir(self) -> Path:
        """Each series' quality report, `<series UID>.json` (clinical.quality's JSON), for the operator."""
        return self.state_dir / "quality"

    @property
    def work_dir(self) -> Path:
        """Each series' download and results while a worker has it; emptied at start (a killed router's)."""
        return self.state_dir / "work"


class PermanentError(RuntimeError):
    """A series that will fail the same way however often it is tried."""


def is_permanent(exc: BaseException) -> bool:
    """Whether a worker's error is the scan's (fail now) rather than a server's or network's (retry)."""
    from client.segmentation_client import SegmentationError
    from clinical.dicom_seg import DicomSegError
    from clinical.dicom_series import DicomInputError

    if isinstance(exc, (PermanentError, DicomInputError, DicomSegError)):
        return True
    if isinstance(exc, SegmentationError):
        return not exc.retryable and not str(exc).startswith("timed out")
    return False


def write_status_file(store: StateStore, path: Path) -> None:
    """The operator's JSON view (atomic): counts per status and every series' row."""
    payload = {"written": time.time(), "counts": store.counts(), "series": [r.as_dict() for r in store.rows()]}
    atomic_write(path, lambda stream: stream.write(json.dumps(payload, indent=1).encode()))


class Router:
    """`Router(config).run()` until `stop()`; or `start()` (threads) and `stop()`.

    Raises sqlite3.Error when the state file cannot be opened, OrthancError at start when Orthanc does
    not answer.
    """

    def __init__(self, config: RouterConfig) -> None:
        if not config.triton_urls:
            raise ValueError("the router needs at least one Triton server URL (-u HOST:PORT)")
        if config.workers_per_server < 1 or config.max_attempts < 1 or config.download_workers < 1:
            raise ValueError("--workers-per-server, --max-attempts and --download-workers must be at least 1")
        if not (config.backoff_base_s >= 0 and config.backoff_cap_s >= 0 and config.poll_s > 0):
            # a negative backoff raised in a worker's error path (the thread died, its series left `running`)
            raise ValueError("--backoff-seconds and --backoff-cap-seconds must be >= 0 and --poll-seconds > 0")
        self.config = config
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._status_lock = threading.Lock()
        self._clients: list[object] = []
        self._clients_lock = threading.Lock()
        self._http: ThreadingHTTPServer | None = None

    # --- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self.config.state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.config.work_dir, ignore_errors=True)  # what a killed router left
        self.config.work_dir.mkdir()
        with StateStore(self.config.state_path) as store:
            recovered = store.recover()
            if recovered:
                log.warning("%d series were running when the router stopped: queued again", recovered)
            if self.config.start_at_end and store.last_seq() == 0 and not store.rows():
                last = OrthancClient(self.config.orthanc_url, auth=self.config.orthanc_auth).last_change()
                store.record_changes([], last)
                log.info("fresh state: starting after Orthanc's change %d (series received before are not routed)",
                         last)
            self._write_status(store)
        self._threads = [threading.Thread(target=self._poll_loop, name="router-poll", daemon=True)]
        for url in self.config.triton_urls:
            for n in range(self.config.workers_per_server):
                self._threads.append(threading.Thread(target=self._work_loop, args=(url, f"{url}#{n}"),
                                                      name=f"router-worker-{url}-{n}", daemon=True))
        for thread in self._threads:
            thread.start()
        if self.config.status_port is not None:
            self._http = _status_server(self, self.config.status_address, self.config.status_port)
            threading.Thread(target=self._http.serve_forever, name="router-status", daemon=True).start()
            log.info("router: status on http://%s:%d/status", self.config.status_address, self.status_port)
        log.info("router: watching %s, %d worker(s) over %s", self.config.orthanc_url, len(self._threads) - 1,
                 ", ".join(self.config.triton_urls))

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop polling, cancel the requests in flight (their series are queued again), join the threads."""
        self._stop.set()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        with self._clients_lock:
            for client in self._clients:
                client.abort()  # type: ignore[attr-defined]
        for thread in self._threads:
            thread.join(timeout_s)

    def run(self) -> None:
        """start(), then wait until stop() or KeyboardInterrupt (which stops)."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        finally:
            self.stop()

    @property
    def status_port(self) -> int:
        """The status endpoint's port (its real one when 0 was asked); 0 without an endpoint."""
        return int(self._http.server_address[1]) if self._http is not None else 0

    def healthy(self) -> bool:
        """Every thread alive (the poller and each worker)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads) and not self._stop.is_set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _write_status(self, store: StateStore) -> None:
        with self._status_lock:
            try:
                write_status_file(store, self.config.status_path)
            except OSError as exc:
                log.error("%s: status file not written (%s)", self.config.status_path, exc)

    # --- the changes feed ------------------------------------------------------------------------
    def poll_once(self, store: StateStore, orthanc: OrthancClient) -> int:
        """Read the changes feed to its end; record every new StableSeries (queued or ignored) together
        with the feed position, page by page. Returns the number of series recorded."""
        added = 0
        since = store.last_seq()
        while not self._stop.is_set():
            changes, last, done = orthanc.changes(since)
            if last < since:
                log.warning("Orthanc's change %d is older than the router's position %d (a new Orthanc database?); "
                            "reading its feed from the start", last, since)
                since = 0
                continue
            new: list[NewSeries] = []
            for change in changes:
                if change.get("ChangeType") != "StableSeries" or store.known(change["ID"]):
                    continue
                new.append(self._new_series(orthanc, change["ID"]))
            added += store.record_changes(new, last)
            for s in new:
                log.info("series %s (%s): %s: %s", s.series_uid, s.orthanc_id, "queued" if s.accepted else "ignored",
                         s.reason)
            if new:
                self._write_status(store)
            since = last
            if done or not changes:
                break
        return added

    def _new_series(self, orthanc: OrthancClient, series_id: str) -> NewSeries:
        try:
            facts, info = orthanc.series_facts(series_id)
        except OrthancError as exc:
            if "HTTP 404" in str(exc):  # deleted from Orthanc since (by someone else)
                return NewSeries(series_id, "", "", False, "gone from Orthanc before it was looked at")
            raise
        series_uid, study_uid = orthanc.series_uids(info)
        decision = decide(self.config.rules, facts)
        return NewSeries(series_id, series_uid, study_uid, decision.accepted, decision.reason)

    def _poll_loop(self) -> None:
        orthanc = OrthancClient(self.config.orthanc_url, timeout_s=30.0, auth=self.config.orthanc_auth)
        with StateStore(self.config.state_path) as store:
            failing = False
            while not self._stop.is_set():
                try:
                    self.poll_once(store, orthanc)
                    failing = False
                except OrthancError as exc:
                    if not failing:  # once per outage, not once per poll
                        log.error("changes feed: %s", exc)
                    failing = True
                except Exception:
                    log.exception("changes feed: unexpected error; trying again")
                self._stop.wait(self.config.poll_s)
        orthanc.close()

    # --- workers ---------------------------------------------------------------------------------
    def _work_loop(self, triton_url: str, name: str) -> None:
        """Claim series and process them, each through a new SegmentationClient: a new gRPC connection per
        series, so that behind a Kubernetes Service (kube-proxy balances connections, not calls) series
        spread over the Triton replicas."""
        from client.segmentation_client import SegmentationClient

        orthanc = OrthancClient(self.config.orthanc_url, auth=self.config.orthanc_auth)
        try:
            with StateStore(self.config.state_path) as store:
                while not self._stop.is_set():
                    row = store.claim(name)
                    if row is None:
                        self._stop.wait(min(self.config.poll_s, 1.0))
                        continue
                    self._write_status(store)
                    client = SegmentationClient(triton_url, timeout_s=self.config.request_timeout_s)
                    with self._clients_lock:
                        self._clients.append(client)
                    if self._stop.is_set():
                        client.abort()
                    try:
                        self._process(store, orthanc, client, row)
                    finally:
                        with self._clients_lock:
                            self._clients.remove(client)
                        client.close()
                    self._write_status(store)
        finally:
            orthanc.close()

    def _process(self, store: StateStore, orthanc: OrthancClient, client: object, row: SeriesRow) -> None:
        stages: dict[str, float] = dict(row.stages)
        stages["started_at"] = time.time()
        try:
            status, message, results = self.segment_series(orthanc, client, row, stages)
        except BaseException as exc:  # noqa: BLE001 - every outcome is recorded; KeyboardInterrupt re-raised below
            if self._stop.is_set():
                log.info("series %s: interrupted by the router's stop; queued again", row.series_uid)
                store.retry_later(row.orthanc_id, "interrupted by a stop; queued again", 0.0)
                return
            if not isinstance(exc, Exception):
                raise
            message = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
            if is_permanent(exc) or row.attempts >= self.config.max_attempts:
                why = "" if is_permanent(exc) else f" (after {row.attempts} attempts)"
                log.error("series %s: failed%s: %s", row.series_uid, why, message)
                store.finish(row.orthanc_id, "failed", message + why, stages=stages)
                orthanc.set_status(row.orthanc_id, "failed")
            else:
                delay = backoff_s(row.attempts, self.config.backoff_base_s, self.config.backoff_cap_s)
                log.warning("series %s: attempt %d failed (%s); next try in %.0f s", row.series_uid, row.attempts,
                            message, delay)
                store.retry_later(row.orthanc_id, f"attempt {row.attempts}: {message}", delay, stages)
            return
        stages["finished_at"] = time.time()
        store.finish(row.orthanc_id, status, message, results, stages)
        orthanc.set_status(row.orthanc_id, status)
        log.info("series %s: %s (%s); %s", row.series_uid, status, message,
                 ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k.endswith("_s")))

    def segment_series(self, orthanc: OrthancClient, client: object, row: SeriesRow,
                       stages: dict[str, float]) -> tuple[str, str, list[str]]:
        """One try of one series; fills `stages` with seconds per stage. Returns (status, message, SOP UIDs)."""
        from clinical.dicom_seg import BUNDLE_VERSION
        from clinical.dicom_series import read_ct_series
        from clinical.quality import write_quality_json
        from router.results import ROUTER_ENCODING, results_for

        folder = Path(tempfile.mkdtemp(prefix="series-", dir=self.config.work_dir))
        try:
            t = time.monotonic()
            instances = folder / "instances"
            instances.mkdir()
            orthanc.download_instances(row.orthanc_id, instances, workers=self.config.download_workers)
            stages["download_s"] = time.monotonic() - t
            t = time.monotonic()
            (series,) = read_ct_series(instances, row.series_uid or None)
            stages["read_s"] = time.monotonic() - t
            shutil.rmtree(instances)  # the volume is in memory; free the disk while the series is segmented
            t = time.monotonic()
            label_map = client.segment(  # type: ignore[attr-defined]
                series.volume, series.affine, self.config.resolution)
            stages["segment_s"] = time.monotonic() - t
            seed = f"{series.series_uid}|{BUNDLE_VERSION}|{self.config.resolution or 'default'}"
            results = results_for(series, label_map, folder, encoding=self.config.seg_encoding or ROUTER_ENCODING,
                                  uid_seed=seed, quality_policy=self.config.quality_policy,
                                  quality_checks=self.config.quality_checks,
                                  structured_report=self.config.structured_report)
            stages.update(results.stages)
            if results.quality is not None:
                self.config.quality_dir.mkdir(parents=True, exist_ok=True)
                name = f"{row.series_uid or row.orthanc_id}.json"
                write_quality_json(results.quality, self.config.quality_dir / name)
            del label_map, series
            t = time.monotonic()
            ids, uids = [], []
            for path in results.files:
                answer = orthanc.store_instance(path)
                ids.append(str(answer["ID"]))
                uids.append(_sop_uid(path))
            stages["store_s"] = time.monotonic() - t
            if results.hold is not None:
                return "held", f"stored in Orthanc, not forwarded: {results.hold}", uids
            if self.config.pacs:
                t = time.monotonic()
                orthanc.forward(self.config.pacs, ids)
                stages["forward_s"] = time.monotonic() - t
                return "done", f"{len(ids)} result(s) stored and forwarded to {self.config.pacs}", uids
            return "done", f"{len(ids)} result(s) stored", uids
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def _status_server(router: Router, address: str, port: int) -> ThreadingHTTPServer:
    """GET /status: {"counts", "series"} as in status.json, read from the state now; GET /healthz: 200 while
    every router thread runs, else 503 (a liveness probe restarts the pod)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?")[0] == "/healthz":
                ok = router.healthy()
                self._send(200 if ok else 503, {"healthy": ok})
            elif self.path.split("?")[0] == "/status":
                with StateStore(router.config.state_path) as store:
                    self._send(200, {"counts": store.counts(), "series": [r.as_dict() for r in store.rows()]})
            else:
                self._send(404, {"error": "GET /status or /healthz"})

        def _send(self, code: int, payload: object) -> None:
            body = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's signature
            log.debug("status endpoint: " + format, *args)

    return ThreadingHTTPServer((address, port), Handler)


def _sop_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def status_table(rows: list[SeriesRow], now: float | None = None) -> str:
    """The operator's table: one line per series (newest last)."""
    now = time.time() if now is None else now
    lines = [f"{'status':8} {'tries':>5} {'age':>7}  {'series (Orthanc ID)':60} message"]
    for r in rows:
        age = now - r.received
        when = f"{age / 3600:.1f}h" if age > 5400 else f"{age / 60:.0f}m" if age > 90 else f"{age:.0f}s"
        extra = ""
        if r.status == "queued" and r.next_try > now:
            extra = f" (next try in {r.next_try - now:.0f} s)"
        series = f"{r.series_uid or '?'} ({r.orthanc_id[:8]})"
        lines.append(f"{r.status:8} {r.attempts:>5} {when:>7}  {series:60} {r.message}{extra}")
    return "\n".join(lines)


__all__ = ["FINAL", "PermanentError", "Router", "RouterConfig", "is_permanent", "status_table", "write_status_file"]
