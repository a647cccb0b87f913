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

Identity, not existence: every record names what its outputs were made from (the input's SHA-256 and
size, `client.inputs.Identity`; the DICOM series UID), the model, resolution and network. A rerun skips
a scan (status "skipped") only when all its outputs exist and the manifest says they were made from
this very input with the same model, resolution and network. An input changed in place, or asked of
another resolution or network, is segmented again. An output that the manifest says was made from
another input (another cohort with the same layout), or that it does not know, is never replaced
without `overwrite`: that scan is refused with one line. One run at a time per output folder:
`OutputLock` (an advisory lock the kernel drops when a run dies, so a crash leaves nothing stuck).

Every failure is seen: an output folder or manifest that cannot be written (disk full, read-only,
permissions) stops the run at once with one line (`CohortSummary.stopped`); finished scans keep their
outputs and records, and nothing is half-written. A thread that fails for any other reason stops the
run the same way. Ctrl-C (KeyboardInterrupt in the calling thread) cancels the requests in flight and
re-raises once the threads are done.

Every scan's outcome is appended to `<output_dir>/segmentation_manifest.jsonl` as it happens (JSON
lines; see `Record`); the records of the latest run (field `run`) cover every scan of that run.

One output that cannot be made never costs a scan its others. A writer may refuse a scan once its volume is
read, before its request (`refusal(volume)`: a DICOM-SEG of a series without UIDs); a writer may fail
while writing (any error but OSError, which stops the run as above). Either way the scan's other outputs
are written and the scan is "done" with `error` (one line naming each output not made and why) and
`missing_outputs`; a rerun segments it again, since not all its outputs exist. A scan none of whose
outputs can be made is "failed" (before its request when every writer refused it). Tracebacks go to the
DEBUG log only.

Padding: each volume's padding voxels (`client.inputs.measure_padding`) are counted when it is read
(`Record.padded_percent`) and, with `CohortOptions.padding_to_air`, set to -1024 HU before it is sent.

The scheduling is independent of Triton: `client_factory` makes any `Segmenter`, so the logic is
tested without a server (tests/test_cohort.py) as well as against real ones (tests/test_client.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from client.inputs import Header, Identity, Scan, ScanError, Volume, measure_padding, source_identity
from client.outputs import NiftiLabelMapWriter, OutputWriter
from client.segmentation_client import SegmentationClient, SegmentationError, ServerLimits
from clinical.statistics import voxel_counts
from wholebody.contract import ENSEMBLE

log = logging.getLogger(__name__)

MANIFEST_NAME = "segmentation_manifest.jsonl"
LOCK_NAME = ".segmentation.lock"
MAX_LINE = 400  # characters of a stop's one line
JOIN_AFTER_STOP_S = 30.0  # how long a stopped run waits for its threads (requests are cancelled first)


class Segmenter(Protocol):
    """What the cohort needs of a server connection (SegmentationClient is one).

    `abort()` (optional) is called from another thread when the run stops: the request in flight must
    end promptly with an error and `close()` must not wait."""

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
    overwrite: bool = False  # replace existing outputs, whatever made them, instead of skipping their scans
    jobs: int = 1  # requests in flight per server
    timeout_s: float | None = None  # per request, from connecting to the last byte
    use_shared_memory: bool | None = None  # None: for servers on this host
    max_attempts: int = 3  # tries of one scan over all servers when servers fail
    counts: bool = False  # count each label's voxels (Record.label_counts)
    # applied to every label map before any writer sees it (e.g. a structure subset); [X, Y, Z] -> same
    label_filter: Callable[[np.ndarray], np.ndarray] | None = None
    command: str = ""  # how the run was started, for the lock (named to a second run refused)
    padding_to_air: bool = False  # set padding voxels (measure_padding) to -1024 HU before sending
    # every other setting that changes what an output holds (e.g. {"roi_subset": [...], "seg_encoding": ...}):
    # recorded with each result, and a rerun with another recipe segments again
    recipe: dict[str, Any] = field(default_factory=dict)


@dataclass
class Record:
    """One line of the manifest: what happened to one scan in one run, and what its outputs are made of."""

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
    input_sha256: str | None = None  # client.inputs.Identity of the input the outputs were made from
    input_bytes: int | None = None
    model: str | None = None  # the ensemble that made the outputs
    resolution: str | None = None  # "highres" | "lowres": asked, else the server's default
    network: str | None = None  # the variant asked; None: the server's default
    padded_percent: float | None = None  # % of the volume's voxels that are padding (measure_padding), as read
    missing_outputs: list[str] | None = None  # outputs of a "done" scan that could not be made (why: `error`)
    recipe: dict[str, Any] | None = None  # CohortOptions.recipe plus padding_to_air, as the outputs were made
    # each output as written: {path relative to the output folder: SHA-256 of its bytes}
    output_sha256: dict[str, str] | None = None
    # with quality checks: clinical.quality.QualityReport.to_manifest() (held, marked, failed, ...)
    quality: dict[str, Any] | None = None
    label_counts: dict[int, int] | None = field(default=None, repr=False)  # not in the manifest

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("label_counts")
        return json.dumps(data)


@dataclass
class CohortSummary:
    records: list[Record]
    wall_seconds: float
    stopped: str | None = None  # why the run stopped before its end (one line), None if it ran to the end

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.records)

    @property
    def incomplete(self) -> int:
        """Scans done without all their outputs (`Record.missing_outputs`)."""
        return sum(bool(r.missing_outputs) for r in self.records if r.status == "done")

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
        partly = f" ({self.incomplete} without all outputs)" if self.incomplete else ""
        return (
            f"{done} done{partly}, {self.count('skipped')} skipped, {self.count('failed')} failed in "
            f"{self.wall_seconds:.1f} s: {per_scan}{self.quality_line()}"
        )

    def quality_line(self) -> str:
        """'; quality checks of N: H held back, M marked' over the N scans with a verdict (`Record.quality`), '' when
        no scan has one: a held result must be visible in the closing line, not only in its _quality.json."""
        verdicts = [r.quality for r in self.records if r.quality is not None and r.status in ("done", "skipped")]
        if not verdicts:
            return ""
        held = sum(bool(q.get("held")) for q in verdicts)
        marked = sum(bool(q.get("marked")) and not q.get("held") for q in verdicts)
        return f"; quality checks of {len(verdicts)}: {held} held back, {marked} marked"


class CohortLocked(RuntimeError):
    """Another run is writing to the same output folder; the message names it."""


class _Stop(Exception):
    """The run cannot go on (an output or the manifest cannot be written); the message is one line."""


class OutputLock:
    """One cohort run at a time per output folder: an exclusive `flock` on `<output_dir>/.segmentation.lock`.

    The kernel drops the lock when its process dies, so a crashed or killed run never leaves the folder
    locked; the file holds the owner's pid, host, start time and command, named to a second run, which
    is refused with CohortLocked. The file is removed on release.
    """

    def __init__(self, output_dir: Path, command: str = "") -> None:
        self.path = output_dir / LOCK_NAME
        self.command = command
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; raises CohortLocked naming the other run, OSError if the folder cannot be written."""
        while True:
            # read-only: the lock is not a writer on the file system (a disk can still be remounted read-only)
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 4096).decode(errors="replace")
                os.close(fd)
                raise CohortLocked(f"{self.path.parent}: another run is writing there ({_describe_owner(owner)}); "
                                   "wait for it to finish or choose another -o") from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the file may have been removed by the owner that released it while we waited: lock anew
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    os.close(fd)
                    continue
            except FileNotFoundError:
                os.close(fd)
                continue
            owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "command": self.command or " ".join(sys.argv)})
            try:
                self.path.write_text(owner)
            except OSError:  # a full disk: the lock holds all the same, only its note is missing
                pass
            self._fd = fd
            return

    def check(self) -> None:
        """Raise _Stop unless the lock file is still this run's (the output folder was removed, renamed or
        replaced mid-run: its outputs would go nowhere, and another run could take the folder)."""
        if self._fd is None:
            return
        try:
            same = os.stat(self.path).st_ino == os.fstat(self._fd).st_ino
        except OSError:
            same = False
        if not same:
            raise _Stop(f"{self.path.parent}: the output folder was removed or replaced during the run; the scans "
                        "written to it before are gone with it: rerun the command")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # a folder gone read-only: the file stays, unlocked (the next run takes it)
            log.debug("cannot remove %s: %s", self.path, exc)
        finally:
            os.close(self._fd)  # closing drops the lock
            self._fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_owner(text: str) -> str:
    try:
        owner = json.loads(text)
        return (f"pid {owner['pid']} on {owner['host']}, started {owner['started']}: {owner['command']}")
    except (ValueError, KeyError, TypeError):
        return "a run that left no note"


class Manifest:
    """Appends records as JSON lines, flushed one by one (a crash loses no finished scan's line).

    Raises OSError when the line cannot be written (the run then stops: `_Run`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, record: Record) -> None:
        line = record.to_json().encode() + b"\n"
        with self._lock, open(self.path, "ab+") as stream:
            if stream.seek(0, os.SEEK_END) > 0:
                stream.seek(-1, os.SEEK_END)
                if stream.read(1) != b"\n":  # a line cut by a crash: end it, so this record stays a line of its own
                    line = b"\n" + line
            stream.write(line)
            stream.flush()
            os.fsync(stream.fileno())


def read_manifest(path: Path, latest_run_only: bool = True, writing: bool = False) -> list[dict[str, Any]]:
    """The manifest's records (of its latest run by default), as dicts. Lines that are not records (cut by
    a crash, edited by hand: not JSON, or fields of the wrong type) are left out with a warning. The
    bookkeeping records of status "writing" (outputs about to be written) only with `writing`.
    Raises OSError when the file cannot be read."""
    records = []
    text = path.read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not _well_formed(record):
            log.warning("%s line %d is not a record (cut by a crash, or edited?); it is left out", path, number)
            continue
        if record["status"] != "writing" or writing:
            records.append(record)
    if latest_run_only and records:
        latest = max(str(r["run"]) for r in records)
        records = [r for r in records if r["run"] == latest]
    return records


def _well_formed(record: object) -> bool:
    """Whether a parsed manifest line has the fields resume relies on, of the right types."""
    if not isinstance(record, dict) or not isinstance(record.get("run"), str):
        return False
    if not isinstance(record.get("status"), str) or not isinstance(record.get("input"), str):
        return False
    lists = [record.get("outputs"), record.get("missing_outputs") or []]
    if not all(isinstance(v, list) and all(isinstance(x, str) for x in v) for v in lists):
        return False
    hashes = record.get("output_sha256") or {}
    return isinstance(hashes, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items())


def output_key(path: Path, output_dir: Path) -> str:
    """How the manifest names an output: its path relative to the output folder (however -o is spelled)."""
    return os.path.relpath(os.path.abspath(path), os.path.abspath(output_dir))


def _origins(output_dir: Path) -> dict[str, dict[str, Any]]:
    """output key (`output_key`) -> the latest record of status done, skipped or writing that lists it."""
    path = output_dir / MANIFEST_NAME
    if not path.exists():
        return {}
    try:
        records = read_manifest(path, latest_run_only=False, writing=True)
    except OSError as exc:
        raise _Stop(f"cannot read the manifest {path}: {exc.strerror or exc}; move it aside to start afresh, "
                    "or fix it") from None
    origins: dict[str, dict[str, Any]] = {}
    for record in records:
        if record["status"] in ("done", "skipped", "writing"):
            missing = set(record.get("missing_outputs") or [])
            keys = list(record.get("output_sha256") or {})
            if not keys:  # a record without keys (older): its outputs as they were spelled
                keys = [output_key(Path(o), output_dir) for o in record["outputs"] if o not in missing]
            for key in keys:
                origins[key] = record
    return origins


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes (an output as written). Raises OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Item:
    scan: Scan
    outputs: list[Path]
    identity: Identity | None = None
    volume: Volume | None = None
    read_seconds: float = 0.0
    attempts: int = 0
    tried: set[str] = field(default_factory=set)
    refused: dict[int, str] = field(default_factory=dict)  # output index -> why its writer refused this scan
    padded_percent: float | None = None


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
        self.stopped: str | None = None  # set once, by stop(): the run ends
        self.clients: set[Segmenter] = set()  # connections in use, aborted by stop()
        self.output_lock: OutputLock | None = None  # checked before each scan's outputs are written

    @property
    def resolution(self) -> str | None:
        return self.options.resolution or (self.limits.default_resolution if self.limits else None)

    @property
    def recipe(self) -> dict[str, Any]:
        """The settings besides model, resolution and network that change what the outputs hold."""
        return {**self.options.recipe, "padding_to_air": self.options.padding_to_air}

    # --- stopping -----------------------------------------------------------------------------
    def stop(self, reason: str) -> None:
        """End the run: no new read or request, requests in flight cancelled; the first reason is kept."""
        reason = " ".join(reason.split())  # one line, whatever a library put in its message
        if len(reason) > MAX_LINE:
            reason = reason[: MAX_LINE - 1] + "…"
        with self.lock:
            if self.stopped is not None:
                return
            self.stopped = reason
            clients = list(self.clients)
            self.lock.notify_all()
        for client in clients:
            abort = getattr(client, "abort", None)
            if abort is not None:
                try:
                    abort()
                except Exception:  # noqa: BLE001 - a connection that cannot abort: its thread is joined with a bound
                    log.debug("aborting a request failed", exc_info=True)

    def guarded(self, target: Callable[..., None], *args: object) -> Callable[[], None]:
        """`target(*args)` for a thread: any failure stops the run with one line instead of dying unseen."""

        def run() -> None:
            try:
                target(*args)
            except _Stop as exc:
                self.stop(str(exc))
            except BaseException as exc:  # noqa: BLE001 - a thread must never die silently
                log.debug("thread %s failed", threading.current_thread().name, exc_info=True)
                self.stop(f"internal error in {threading.current_thread().name}: {type(exc).__name__}: {exc}")

        return run

    # --- records ------------------------------------------------------------------------------
    def record(self, item: _Item, status: str, **fields: Any) -> None:
        """Append the scan's record to the manifest; raises _Stop if the manifest cannot be written."""
        made = status in ("done", "skipped", "writing")
        identity = fields.pop("identity", None) or item.identity
        record = Record(
            run=self.started,
            input=str(item.scan.source),
            outputs=[str(p) for p in item.outputs],
            status=status,
            series_uid=item.scan.series_uid,
            read_seconds=round(item.read_seconds, 3) if item.read_seconds else None,
            attempts=item.attempts,
            padded_percent=item.padded_percent,
            input_sha256=identity.sha256 if identity else None,
            input_bytes=identity.size if identity else None,
            model=fields.pop("model", ENSEMBLE if made else None),
            resolution=fields.pop("resolution", self.resolution if made else None),
            network=fields.pop("network", self.options.network if made else None),
            recipe=fields.pop("recipe", self.recipe if made else None),
            **fields,
        )
        try:
            self.manifest.append(record)
        except OSError as exc:
            raise _Stop(f"cannot write the manifest {self.manifest.path}: {exc.strerror or exc}; finished scans "
                        "are kept: make room or fix the folder, then rerun the same command to resume") from None
        if status == "writing":  # bookkeeping: what a crash before the final record leaves to the next run
            return
        with self.lock:
            self.records.append(record)
            self.lock.notify_all()
        if self.on_record is not None:
            self.on_record(record)

    def settle(self, item: _Item, status: str, **fields: Any) -> None:
        """A read scan's final record; frees its slot for the next read (also when the record fails)."""
        try:
            self.record(item, status, **fields)
        finally:
            self.release(item)

    def release(self, item: _Item) -> None:
        """A scan is settled (or given up): free its volume and its slot for the next read."""
        item.volume = None
        with self.lock:
            self.outstanding -= 1
            self.lock.notify_all()
        self.slots.release()

    # --- threads ------------------------------------------------------------------------------
    def read_all(self, todo: list[_Item]) -> None:
        try:
            self._read_all(todo)
        finally:
            with self.lock:
                self.done_reading = True
                self.lock.notify_all()

    def _read_all(self, todo: list[_Item]) -> None:
        for item in todo:
            self.slots.acquire()
            with self.lock:
                if self.stopped is not None:
                    return
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
                before = item.identity or source_identity(item.scan.source)
                item.volume = item.scan.read_volume()
                # hashed around the read: the record must name the bytes that were segmented
                item.identity = source_identity(item.scan.source)
                if item.identity != before:
                    raise ScanError(f"{item.scan.label}: changed while this run read it (or since it was checked); "
                                    "not segmented: rerun once it is complete")
                padded = measure_padding(item.volume, to_air=self.options.padding_to_air)
                item.padded_percent = round(100.0 * padded / max(item.volume.array.size, 1), 2)
                item.refused = self.refusals(item)
            except (ScanError, SegmentationError) as exc:
                message = str(exc) if str(exc).startswith(str(item.scan.source)) else f"{item.scan.label}: {exc}"
                self.settle(item, "failed", error=message)
                continue
            except Exception as exc:  # a bug or the machine: this scan fails, the cohort goes on
                log.debug("reading %s failed", item.scan.label, exc_info=True)
                self.settle(item, "failed", error=f"{item.scan.label}: cannot read it: {type(exc).__name__}: {exc}")
                continue
            item.read_seconds = time.perf_counter() - start
            if len(item.refused) == len(item.outputs):  # nothing asked could be made: no request
                self.settle(item, "failed", error=f"{item.scan.label}: not segmented, no output can be made: "
                            + "; ".join(item.refused.values()))
                continue
            self.ready.put(item)
            if not self.live:
                self.fail_queued("no server is left")

    def refusals(self, item: _Item) -> dict[int, str]:
        """Output index -> why its writer cannot make it from this volume (`refusal`), asked before the request."""
        assert item.volume is not None
        refused = {}
        for index, (writer, path) in enumerate(zip(self.writers, item.outputs, strict=True)):
            refusal = getattr(writer, "refusal", None)
            why = refusal(item.volume) if refusal is not None else None
            if why:
                refused[index] = f"{path.name} not written: {why}"
        return refused

    def serve(self, url: str) -> None:
        """One in-flight slot on server `url`: take read scans, segment them, hand them to the writer."""
        client = self.client_factory(url)
        with self.lock:
            self.clients.add(client)
        try:
            while True:
                try:
                    item = self.ready.get(timeout=0.1)
                except queue.Empty:
                    with self.lock:
                        if (self.done_reading and self.outstanding == 0) or url not in self.live or self.stopped:
                            return
                    continue
                if url not in self.live or self.stopped:
                    self.ready.put(item)
                    return
                others = (self.live - item.tried) - {url}
                if url in item.tried and others:
                    self.ready.put(item)  # let a server that has not failed it take it
                    time.sleep(0.05)
                    continue
                self.segment(client, url, item)
        finally:
            with self.lock:
                self.clients.discard(client)
            client.close()

    def segment(self, client: Segmenter, url: str, item: _Item) -> None:
        assert item.volume is not None
        item.attempts += 1
        item.tried.add(url)
        start = time.perf_counter()
        try:
            label_map = client.segment_volume(item.volume, self.options.resolution, self.options.network)
        except SegmentationError as exc:
            if self.stopped is not None:
                return  # cancelled by stop(): the scan keeps no record in a stopped run
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
            log.debug("segmenting %s on %s failed", item.scan.label, url, exc_info=True)
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
                    others = "its scans go to the other servers" if len(self.live) > 1 else "no other server is left"
                    log.error("server %s stopped answering (%s); %s", url, exc, others)
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
            if self.stopped is not None:
                continue  # a stopped run writes nothing more; the main thread is not waiting on it
            self.write(finished)

    def write(self, finished: _Finished) -> None:
        item = finished.item
        assert item.volume is not None
        start = time.perf_counter()
        written: list[Path] = []
        missing = dict(item.refused)  # output index -> one line: why it was not made
        if self.output_lock is not None:
            self.output_lock.check()  # the output folder removed or replaced mid-run: stop, write nothing
        # before any output exists: what it is made from, so a run killed mid-write leaves nothing unexplained
        self.record(item, "writing", output_sha256={output_key(p, self.options.output_dir): "" for p in item.outputs})
        try:
            if self.options.label_filter is not None:
                finished.label_map = self.options.label_filter(finished.label_map)
            for index, (writer, path) in enumerate(zip(self.writers, item.outputs, strict=True)):
                if index in missing:
                    continue
                try:
                    writer.write(finished.label_map, item.volume, path)
                except OSError:
                    raise
                except Exception as exc:  # noqa: BLE001 - this output only (e.g. a DICOM-SEG): the others are written
                    log.debug("writing %s of %s failed", path, item.scan.label, exc_info=True)
                    missing[index] = f"{path.name} not written: {type(exc).__name__}: {' '.join(str(exc).split())}"
                    continue
                written.append(path)
        except OSError as exc:  # disk full, read-only, permissions: every later scan would fail the same way
            where = exc.filename or ", ".join(map(str, item.outputs))
            self.settle_unwritten(item, written)
            raise _Stop(f"{item.scan.label}: cannot write {where}: {exc.strerror or exc}; finished scans are "
                        "kept: make room or fix the folder, then rerun the same command to resume") from None
        except Exception as exc:  # the label filter (before any output is written): this scan only
            log.debug("filtering the labels of %s failed", item.scan.label, exc_info=True)
            self.settle(item, "failed", server=finished.server, seconds=round(finished.seconds, 3),
                        error=f"{item.scan.label}: cannot filter its labels: {type(exc).__name__}: {exc}")
            return
        if not written:
            self.settle(item, "failed", server=finished.server, seconds=round(finished.seconds, 3),
                        error=f"{item.scan.label}: " + "; ".join(missing[i] for i in sorted(missing)))
            return
        quality = None
        for index, writer in enumerate(self.writers):
            summary = getattr(writer, "manifest_summary", None)  # the quality checks' verdict, for the manifest
            if summary is not None and index not in missing:
                quality = summary(finished.label_map, item.volume)
        counts = None
        if self.options.counts:
            values = voxel_counts(finished.label_map)
            counts = {i: int(c) for i, c in enumerate(values) if c and i}
        item.volume = None  # free it before the next read
        try:
            hashes = {output_key(path, self.options.output_dir): file_sha256(path) for path in written}
        except OSError as exc:
            self.settle_unwritten(item, written)
            raise _Stop(f"{item.scan.label}: cannot read back its outputs: {exc.strerror or exc}; finished scans "
                        "are kept: fix the folder, then rerun the same command to resume") from None
        try:
            self.settle(
                item, "done", server=finished.server, seconds=round(finished.seconds, 3), output_sha256=hashes,
                write_seconds=round(time.perf_counter() - start, 3), label_counts=counts, quality=quality,
                error=f"{item.scan.label}: " + "; ".join(missing[i] for i in sorted(missing)) if missing else None,
                missing_outputs=[str(item.outputs[i]) for i in sorted(missing)] or None,
            )
        except _Stop:
            # outputs without their record would be refused by a rerun as of unknown origin: take them back
            for path in written:
                path.unlink(missing_ok=True)
            raise

    def settle_unwritten(self, item: _Item, written: list[Path]) -> None:
        """A scan whose outputs could not all be written: remove those that were, free its slot."""
        for path in written:
            with contextlib.suppress(OSError):
                path.unlink()
        self.release(item)


def _resume_decision(
    item: _Item, origins: dict[str, dict[str, Any]], output_dir: Path, asked: dict[str, Any]
) -> tuple[str, str | None]:
    """("skip" | "segment" | "refuse", a one-line reason) for a scan some of whose outputs exist.

    `asked`: what this run would make the outputs with (model, resolution, network, recipe)."""
    existing = [p for p in item.outputs if p.exists()]
    made = [origins.get(output_key(p, output_dir)) for p in existing]
    unknown = [p for p, m in zip(existing, made) if m is None]
    if unknown:
        return "refuse", (f"{item.scan.label}: {unknown[0]} exists, but {MANIFEST_NAME} does not say it was made from "
                          "this scan (another run's or an older client's output?); --overwrite replaces it, or "
                          "choose another -o")
    identity = item.identity = source_identity(item.scan.source)
    for path, origin in zip(existing, made):
        assert origin is not None
        same_data = origin.get("input_sha256") == identity.sha256 and origin.get("series_uid") == item.scan.series_uid
        if not same_data:
            if origin.get("input") != str(item.scan.source) or origin.get("series_uid") != item.scan.series_uid:
                return "refuse", (f"{item.scan.label}: {path} was made from another input, {origin.get('input')}"
                                  f"{' (series ' + str(origin['series_uid']) + ')' if origin.get('series_uid') else ''}"
                                  "; --overwrite replaces it, or choose another -o")
            return "segment", f"{item.scan.label} changed since {path} was made from it; segmenting it again"
        if origin["status"] == "writing":  # a run stopped while writing this scan's outputs: make them anew
            return "segment", f"{item.scan.label}: {path} may be incomplete (a run stopped while writing it); again"
        written = (origin.get("output_sha256") or {}).get(output_key(path, output_dir))
        if written is None or file_sha256(path) != written:
            return "refuse", (f"{item.scan.label}: {path} is not the file the manifest says was written (changed or "
                              "replaced since); --overwrite replaces it, or choose another -o")
        differs = [f"{k} {origin.get(k)} -> {v}" for k, v in asked.items() if origin.get(k) != v]
        if differs:
            return "segment", f"{item.scan.label}: {path} was made with another {', '.join(differs)}; segmenting again"
    if len(existing) < len(item.outputs):
        return "segment", None
    return "skip", None


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
        The summary with one record per scan of the plan, or, for a run that stopped (`stopped`: an
        output or the manifest could not be written), of the scans settled before it stopped. Servers
        that do not answer at the start get no work; if none answers, every scan not skipped fails with
        that reason.
    Raises:
        CohortLocked: another run holds the output folder (nothing was done).
        OSError: the output folder cannot be made or locked.
        KeyboardInterrupt: re-raised after the requests in flight were cancelled and the threads ended.
    """
    if client_factory is None:
        def client_factory(url: str) -> Segmenter:
            return SegmentationClient(url, use_shared_memory=options.use_shared_memory, timeout_s=options.timeout_s)

    options.output_dir.mkdir(parents=True, exist_ok=True)
    with OutputLock(options.output_dir, options.command) as lock:
        return _run_locked(plan, urls, options, writers, client_factory, on_record, lock)


def _run_locked(
    plan: dict[Scan, list[Path]],
    urls: Sequence[str],
    options: CohortOptions,
    writers: Sequence[OutputWriter],
    client_factory: Callable[[str], Segmenter],
    on_record: Callable[[Record], None] | None,
    lock: OutputLock | None = None,
) -> CohortSummary:
    run = _Run(plan, urls, options, writers, client_factory, on_record)
    run.output_lock = lock
    start = time.perf_counter()

    def summary() -> CohortSummary:
        return CohortSummary(run.records, time.perf_counter() - start, run.stopped)

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
        finally:
            probe.close()
    try:
        todo = _sort_out(run, plan, options)
        if todo and not run.live:
            for url_problem in problems:
                log.error("error: %s", url_problem)
            for item in todo:
                run.record(item, "failed", error=f"{item.scan.label}: not attempted: {'; '.join(problems)}")
            return summary()
    except _Stop as exc:
        run.stop(str(exc))
        return summary()
    if not todo:
        return summary()
    for url_problem in problems:
        log.error("error: %s", url_problem)
    threads = [
        threading.Thread(target=run.guarded(run.serve, url), name=f"request-{url}-{i}", daemon=True)
        for url in sorted(run.live)
        for i in range(options.jobs)
    ]
    threads.append(threading.Thread(target=run.guarded(run.write_all), name="writer", daemon=True))
    reader = threading.Thread(target=run.guarded(run.read_all, todo), name="reader", daemon=True)
    for thread in [*threads, reader]:
        thread.start()
    try:
        with run.lock:
            while not run.lock.wait_for(lambda: run.stopped is not None or (
                    run.done_reading and run.outstanding == 0), timeout=0.5):
                pass
    except KeyboardInterrupt:
        run.stop("interrupted")
        _join(run, reader, threads)
        raise
    _join(run, reader, threads)
    return summary()


def _sort_out(run: _Run, plan: dict[Scan, list[Path]], options: CohortOptions) -> list[_Item]:
    """Record the scans a rerun skips or refuses; the scans to segment, in plan order."""
    origins = {} if options.overwrite else _origins(options.output_dir)
    asked = {"model": ENSEMBLE, "resolution": run.resolution, "network": options.network, "recipe": run.recipe}
    if run.resolution is None:  # no server answered and none was asked: unknown, so not a reason to segment again
        del asked["resolution"]
    todo = []
    for scan, outputs in plan.items():
        item = _Item(scan, outputs)
        if options.overwrite or not any(p.exists() for p in outputs):
            todo.append(item)
            continue
        try:
            decision, why = _resume_decision(item, origins, options.output_dir, asked)
        except (ScanError, OSError) as exc:
            run.record(item, "failed", error=f"{item.scan.label}: {' '.join(str(exc).split())}")
            continue
        if decision == "skip":
            origin = origins[output_key(outputs[0], options.output_dir)]
            keys = [output_key(p, options.output_dir) for p in outputs]
            hashes = {k: origins[k]["output_sha256"][k] for k in keys}  # each checked by _resume_decision
            run.record(item, "skipped", model=origin.get("model"), resolution=origin.get("resolution"),
                       network=origin.get("network"), recipe=origin.get("recipe"), output_sha256=hashes,
                       quality=origin.get("quality"))
        elif decision == "refuse":
            run.record(item, "failed", error=why)
        else:
            if why:
                log.info("%s", why)
            todo.append(item)
    return todo


def _join(run: _Run, reader: threading.Thread, threads: list[threading.Thread]) -> None:
    """Let the threads end: the writer gets its end marker; after a stop, waits at most JOIN_AFTER_STOP_S."""
    if run.stopped is not None:
        # a reader waiting for a free slot, and request threads waiting for work, are let go
        for _ in range(len(threads) + 1):
            run.slots.release()
    run.finished.put(None)
    deadline = time.monotonic() + JOIN_AFTER_STOP_S
    for thread in [reader, *threads]:
        thread.join(None if run.stopped is None else max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("%s did not end within %.0f s of the stop; leaving it", thread.name, JOIN_AFTER_STOP_S)


def _tighter(a: ServerLimits, b: ServerLimits) -> ServerLimits:
    """The stricter of two servers' limits (a scan may go to either)."""

    def low(x: int | None, y: int | None) -> int | None:
        return y if x is None else x if y is None else min(x, y)

    return ServerLimits(
        low(a.max_input_voxels, b.max_input_voxels),
        low(a.max_resampled_voxels, b.max_resampled_voxels),
        a.default_resolution or b.default_resolution,
    )
