"""Segmenting a cohort: many scans over one or several servers, overlapped, resumable, each result once.

    scans = discover([Path("cohort/")]).scans
    plan = plan_outputs(scans, Path("labels"), [NiftiLabelMapWriter()], "_seg")
    summary = run_cohort(plan, ["gpu1:8001", "gpu2:8001"], CohortOptions(output_dir=Path("labels"), jobs=2))

How it runs: one reader thread reads the next scans (header first: a volume above the server's limits
is refused before its voxels are read) while `jobs` requests per server are in flight, each on its own
`SegmentationClient`; one writer thread writes finished label maps while the servers compute. At most
`servers x jobs + 1` volumes are held at once. A scan whose server fails (unreachable, gone
mid-request, its model process died) goes back to the queue for another server, at most
`max_attempts` times in all; a server that no longer answers gets no more work. A result is written
only after its request succeeded, by the one writer, so every output is written at most once.

Resume: a scan whose outputs all exist is skipped (status "skipped") unless `overwrite`. Every scan's
outcome is appended to `<output_dir>/segmentation_manifest.jsonl` as it happens (JSON lines; see
`Record`); the records of the latest run (field `run`) cover every scan of that run.

The scheduling is independent of Triton: `client_factory` makes any `Segmenter`, so the logic is
tested without a server (tests/test_cohort.py) as well as against real ones (tests/test_client.py).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np

from client.inputs import Header, Scan, ScanError, Volume
from client.outputs import NiftiLabelMapWriter, OutputWriter
from client.segmentation_client import SegmentationClient, SegmentationError, ServerLimits

log = logging.getLogger(__name__)

MANIFEST_NAME = "segmentation_manifest.jsonl"


class Segmenter(Protocol):
    """What the cohort needs of a server connection (SegmentationClient is one)."""

    def check_ready(self) -> None: ...

    def limits(self) -> ServerLimits: ...

    def segment_volume(
        self, volume: Volume, resolution: str | None = None, network: str | None = None
    ) -> np.ndarray: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class CohortOptions:
    output_dir: Path
    resolution: str | None = None  # None: the server's default
    network: str | None = None  # None: the server's default
    overwrite: bool = False  # replace existing outputs instead of skipping their scans
    jobs: int = 1  # requests in flight per server
    timeout_s: float | None = None  # per request, from connecting to the last byte
    use_shared_memory: bool | None = None  # None: for servers on this host
    max_attempts: int = 3  # tries of one scan over all servers when servers fail
    counts: bool = False  # count each label's voxels (Record.label_counts)
    # applied to every label map before any writer sees it (e.g. a structure subset); [X, Y, Z] -> same
    label_filter: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class Record:
    """One line of the manifest: what happened to one scan in one run."""

    run: str  # when the run started (UTC, ISO 8601)
    input: str
    outputs: list[str]
    status: str  # "done" | "skipped" | "failed"
    server: str | None = None  # the server that segmented it
    seconds: float | None = None  # the successful request, s
    read_seconds: float | None = None
    write_seconds: float | None = None
    attempts: int = 0
    error: str | None = None
    series_uid: str | None = None  # the DICOM series of `input` (a folder or .zip); None for a NIfTI file
    label_counts: dict[int, int] | None = field(default=None, repr=False)  # not in the manifest

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("label_counts")
        return json.dumps(data)


@dataclass
class CohortSummary:
    records: list[Record]
    wall_seconds: float

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def scans_per_minute(self) -> float:
        done = self.count("done")
        return 60.0 * done / self.wall_seconds if done and self.wall_seconds > 0 else 0.0

    def line(self) -> str:
        done = self.count("done")
        per_scan = (
            f"{self.wall_seconds / done:.1f} s per scan, {self.scans_per_minute:.2f} scans per minute"
            if done
            else "no scan segmented"
        )
        return (
            f"{done} done, {self.count('skipped')} skipped, {self.count('failed')} failed in "
            f"{self.wall_seconds:.1f} s: {per_scan}"
        )


class Manifest:
    """Appends records as JSON lines, flushed one by one (a crash loses no finished scan's line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: Record) -> None:
        with self._lock, open(self.path, "a", encoding="utf-8") as stream:
            stream.write(record.to_json() + "\n")


def read_manifest(path: Path, latest_run_only: bool = True) -> list[dict[str, object]]:
    """The manifest's records (of its latest run by default), as dicts."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if latest_run_only and records:
        latest = max(str(r["run"]) for r in records)
        records = [r for r in records if r["run"] == latest]
    return records


@dataclass
class _Item:
    scan: Scan
    outputs: list[Path]
    volume: Volume | None = None
    read_seconds: float = 0.0
    attempts: int = 0
    tried: set[str] = field(default_factory=set)


@dataclass
class _Finished:
    item: _Item
    label_map: np.ndarray
    server: str
    seconds: float


class _Run:
    """The state of one run shared by its threads."""

    def __init__(
        self,
        plan: dict[Scan, list[Path]],
        urls: Sequence[str],
        options: CohortOptions,
        writers: Sequence[OutputWriter],
        client_factory: Callable[[str], Segmenter],
        on_record: Callable[[Record], None] | None,
    ) -> None:
        self.plan, self.urls, self.options, self.writers = plan, list(urls), options, list(writers)
        self.client_factory, self.on_record = client_factory, on_record
        self.started = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        self.manifest = Manifest(options.output_dir / MANIFEST_NAME)
        self.records: list[Record] = []
        self.lock = threading.Condition()
        self.ready: queue.Queue[_Item] = queue.Queue()
        self.finished: queue.Queue[_Finished | None] = queue.Queue()
        self.slots = threading.Semaphore(len(self.urls) * options.jobs + 1)
        self.live: set[str] = set(self.urls)
        self.outstanding = 0  # scans read or being read, without a final record yet
        self.done_reading = False
        self.limits: ServerLimits | None = None

    # --- records ------------------------------------------------------------------------------
    def record(self, item: _Item, status: str, **fields: object) -> None:
        record = Record(
            run=self.started,
            input=str(item.scan.source),
            outputs=[str(p) for p in item.outputs],
            status=status,
            series_uid=item.scan.series_uid,
            read_seconds=round(item.read_seconds, 3) if item.read_seconds else None,
            attempts=item.attempts,
            **fields,  # type: ignore[arg-type]
        )
        self.manifest.append(record)
        with self.lock:
            self.records.append(record)
            self.lock.notify_all()
        if self.on_record is not None:
            self.on_record(record)

    def settle(self, item: _Item, status: str, **fields: object) -> None:
        """A read scan's final record; frees its slot for the next read."""
        self.record(item, status, **fields)
        item.volume = None  # free it before the next read
        with self.lock:
            self.outstanding -= 1
            self.lock.notify_all()
        self.slots.release()

    # --- threads ------------------------------------------------------------------------------
    def read_all(self, todo: list[_Item]) -> None:
        for item in todo:
            self.slots.acquire()
            with self.lock:
                no_server = not self.live
                self.outstanding += 1
            if no_server:
                self.settle(item, "failed", error=f"{item.scan.label}: not attempted, no server is left")
                continue
            start = time.perf_counter()
            try:
                header: Header = item.scan.read_header()
                if self.limits is not None:
                    self.limits.check(header, self.options.resolution)
                item.volume = item.scan.read_volume()
            except (ScanError, SegmentationError) as exc:
                message = str(exc) if str(exc).startswith(str(item.scan.source)) else f"{item.scan.label}: {exc}"
                self.settle(item, "failed", error=message)
                continue
            except Exception as exc:  # a bug or the machine: this scan fails, the cohort goes on
                log.exception("reading %s failed", item.scan.label)
                self.settle(item, "failed", error=f"{item.scan.label}: cannot read it: {type(exc).__name__}: {exc}")
                continue
            item.read_seconds = time.perf_counter() - start
            self.ready.put(item)
            if not self.live:
                self.fail_queued("no server is left")

    def serve(self, url: str) -> None:
        """One in-flight slot on server `url`: take read scans, segment them, hand them to the writer."""
        client = self.client_factory(url)
        try:
            while True:
                try:
                    item = self.ready.get(timeout=0.1)
                except queue.Empty:
                    with self.lock:
                        if (self.done_reading and self.outstanding == 0) or url not in self.live:
                            return
                    continue
                if url not in self.live:
                    self.ready.put(item)
                    return
                others = (self.live - item.tried) - {url}
                if url in item.tried and others:
                    self.ready.put(item)  # let a server that has not failed it take it
                    time.sleep(0.05)
                    continue
                self.segment(client, url, item)
        finally:
            client.close()

    def segment(self, client: Segmenter, url: str, item: _Item) -> None:
        assert item.volume is not None
        item.attempts += 1
        item.tried.add(url)
        start = time.perf_counter()
        try:
            label_map = client.segment_volume(item.volume, self.options.resolution, self.options.network)
        except SegmentationError as exc:
            if exc.retryable:
                self.server_failed(client, url, exc)
                with self.lock:
                    retry = item.attempts < self.options.max_attempts and bool(self.live)
                if retry:
                    log.warning("%s: %s; retrying on another server", item.scan.label, exc)
                    self.ready.put(item)
                    if not self.live:
                        self.fail_queued("no server is left")
                    return
            self.settle(item, "failed", server=url, error=f"{item.scan.label}: {exc}")
            return
        except Exception as exc:  # e.g. no memory for a shared-memory region: this scan fails, the rest go on
            log.exception("segmenting %s on %s failed", item.scan.label, url)
            self.settle(item, "failed", server=url, error=f"{item.scan.label}: {type(exc).__name__}: {exc}")
            return
        self.finished.put(_Finished(item, label_map, url, time.perf_counter() - start))

    def server_failed(self, client: Segmenter, url: str, exc: SegmentationError) -> None:
        """After a server-side failure: if the server no longer answers, give it no more work."""
        try:
            client.check_ready()
        except SegmentationError:
            with self.lock:
                if url in self.live:
                    log.error("server %s stopped answering (%s); its scans go to the other servers", url, exc)
                self.live.discard(url)
                none_left = not self.live
            if none_left:
                self.fail_queued("no server is left")

    def fail_queued(self, reason: str) -> None:
        while True:
            try:
                item = self.ready.get_nowait()
            except queue.Empty:
                return
            self.settle(item, "failed", error=f"{item.scan.label}: {reason}")

    def write_all(self) -> None:
        while (finished := self.finished.get()) is not None:
            item = finished.item
            assert item.volume is not None
            start = time.perf_counter()
            try:
                if self.options.label_filter is not None:
                    finished.label_map = self.options.label_filter(finished.label_map)
                for writer, path in zip(self.writers, item.outputs, strict=True):
                    writer.write(finished.label_map, item.volume, path)
            except Exception as exc:  # disk full, permissions, a writer's bug: this scan fails, the rest go on
                if not isinstance(exc, OSError):
                    log.exception("writing the outputs of %s failed", item.scan.label)
                reason = f"{exc.strerror or exc}" if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
                where = getattr(exc, "filename", None) or ", ".join(map(str, item.outputs))
                self.settle(
                    item, "failed", server=finished.server, seconds=round(finished.seconds, 3),
                    error=f"{item.scan.label}: cannot write {where}: {reason}",
                )
                continue
            counts = None
            if self.options.counts:
                values = np.bincount(finished.label_map.reshape(-1))
                counts = {i: int(c) for i, c in enumerate(values) if c and i}
            item.volume = None  # free it before the next read
            self.settle(
                item, "done", server=finished.server, seconds=round(finished.seconds, 3),
                write_seconds=round(time.perf_counter() - start, 3), label_counts=counts,
            )


def run_cohort(
    plan: dict[Scan, list[Path]],
    urls: Sequence[str],
    options: CohortOptions,
    writers: Sequence[OutputWriter] = (NiftiLabelMapWriter(),),
    client_factory: Callable[[str], Segmenter] | None = None,
    on_record: Callable[[Record], None] | None = None,
) -> CohortSummary:
    """Segment every scan of `plan` (scan -> its output paths, from `client.outputs.plan_outputs`).

    Args:
        urls: gRPC endpoints; the cohort is spread over them, `options.jobs` requests each.
        client_factory: makes one connection per in-flight slot; default SegmentationClient with
            `options`' timeout and shared-memory choice.
        on_record: called with every scan's record as it is settled (from worker threads).
    Returns:
        The summary with one record per scan of the plan. Servers that do not answer at the start
        get no work; if none answers, every scan not skipped fails with that reason.
    """
    if client_factory is None:
        def client_factory(url: str) -> Segmenter:
            return SegmentationClient(url, use_shared_memory=options.use_shared_memory, timeout_s=options.timeout_s)

    options.output_dir.mkdir(parents=True, exist_ok=True)
    run = _Run(plan, urls, options, writers, client_factory, on_record)
    start = time.perf_counter()
    todo: list[_Item] = []
    for scan, outputs in plan.items():
        item = _Item(scan, outputs)
        if not options.overwrite and all(p.exists() for p in outputs):
            run.record(item, "skipped")
        else:
            todo.append(item)
    if todo:
        run.live = set()
        problems = []
        for url in urls:
            probe = client_factory(url)
            try:
                probe.check_ready()
                limits = probe.limits()
                run.limits = limits if run.limits is None else _tighter(run.limits, limits)
                run.live.add(url)
            except SegmentationError as exc:
                problems.append(str(exc))
                log.error("error: %s", exc)
            finally:
                probe.close()
        if not run.live:
            for item in todo:
                run.record(item, "failed", error=f"{item.scan.label}: not attempted: {'; '.join(problems)}")
            return CohortSummary(run.records, time.perf_counter() - start)
        workers = [
            threading.Thread(target=run.serve, args=(url,), name=f"request-{url}-{i}", daemon=True)
            for url in sorted(run.live)
            for i in range(options.jobs)
        ]
        writer = threading.Thread(target=run.write_all, name="writer", daemon=True)
        for thread in [*workers, writer]:
            thread.start()
        run.read_all(todo)
        with run.lock:
            run.done_reading = True
            run.lock.wait_for(lambda: run.outstanding == 0)
        run.finished.put(None)
        for thread in [*workers, writer]:
            thread.join()
    return CohortSummary(run.records, time.perf_counter() - start)


def _tighter(a: ServerLimits, b: ServerLimits) -> ServerLimits:
    """The stricter of two servers' limits (a scan may go to either)."""

    def low(x: int | None, y: int | None) -> int | None:
        return y if x is None else x if y is None else min(x, y)

    return ServerLimits(
        low(a.max_input_voxels, b.max_input_voxels),
        low(a.max_resampled_voxels, b.max_resampled_voxels),
        a.default_resolution or b.default_resolution,
    )
