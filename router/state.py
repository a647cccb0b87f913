"""The router's durable state: one SQLite file (stdlib sqlite3, WAL) of series and the changes-feed position.

A series row: Orthanc's series ID (primary key: one row per series, so none is processed twice), its
DICOM UIDs, status, attempts, the time of its next try, the last error or the rules' reason, its result
files' SOP Instance UIDs and per-stage seconds (JSON). Statuses:

- ``queued``: taken by the rules, waiting for a worker (or for `next_try` after a failure);
- ``running``: a worker has it; at start-up every ``running`` row goes back to ``queued`` (its worker died);
- ``done``: results stored in Orthanc (and forwarded, when a PACS is set);
- ``held``: results stored in Orthanc but not forwarded (the results hook held them back, e.g. a QC failure);
- ``failed``: no more tries (a permanent error, or `max_attempts` reached);
- ``ignored``: refused by the rules (the reason says which rule); decided again if the series becomes stable again.

The changes-feed position is written in the same transaction as the rows the feed's page produced
(`record_changes`), so a crash loses neither: a restart re-reads from the last committed position, and
series already recorded are not recorded twice.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("queued", "running", "done", "held", "failed", "ignored")
FINAL = ("done", "held", "failed", "ignored")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    orthanc_id TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    received REAL NOT NULL,
    updated REAL NOT NULL,
    worker TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT '',
    results TEXT NOT NULL DEFAULT '[]',
    stages TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS series_status ON series (status, next_try);
CREATE TABLE IF NOT EXISTS feed (id INTEGER PRIMARY KEY CHECK (id = 1), last_seq INTEGER NOT NULL);
"""


def backoff_s(attempt: int, base_s: float, cap_s: float) -> float:
    """Seconds to wait before try `attempt + 1` after try `attempt` (1-based) failed: base * 2^(attempt-1),
    at most `cap_s`. Raises ValueError for attempt < 1 or negative times."""
    if attempt < 1 or base_s < 0 or cap_s < 0:
        raise ValueError(f"backoff needs attempt >= 1 and times >= 0, got {attempt}, {base_s}, {cap_s}")
    return float(min(cap_s, base_s * 2 ** min(attempt - 1, 62)))


@dataclass(frozen=True)
class SeriesRow:
    orthanc_id: str
    series_uid: str
    study_uid: str
    status: str
    attempts: int
    next_try: float  # time.time() seconds
    received: float
    updated: float
    worker: str
    message: str
    results: list[str]  # SOP Instance UIDs of the stored results
    stages: dict[str, float]  # stage -> seconds (and "queued_at" etc.: time.time() stamps)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class NewSeries:
    """A StableSeries change turned into a row: queued (rules took it) or ignored (reason)."""

    orthanc_id: str
    series_uid: str
    study_uid: str
    accepted: bool
    reason: str


class StateStore:
    """The SQLite state file. One instance per thread (sqlite3 connections are not shared across threads).

    Raises sqlite3.Error on a corrupt or unwritable file (the CLI turns it into one line naming the file).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> StateStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the feed ---------------------------------------------------------------------------
    def last_seq(self) -> int:
        row = self._db.execute("SELECT last_seq FROM feed WHERE id = 1").fetchone()
        return int(row["last_seq"]) if row else 0

    def record_changes(self, new: Iterable[NewSeries], last_seq: int, now: float | None = None) -> int:
        """Record the series of one page of the changes feed and the feed position, in one transaction.
        A series already known keeps its row (its repeated StableSeries is not a new series), except an
        `ignored` one that the rules now take: it became stable again with more instances (a slow sender's
        first part was refused, e.g. for too few slices) and is queued. Returns the number of rows added or
        queued again."""
        now = time.time() if now is None else now
        added = 0
        with self._transaction():
            for s in new:
                cursor = self._db.execute(
                    "INSERT OR IGNORE INTO series (orthanc_id, series_uid, study_uid, status, received, updated, "
                    "message, stages) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (s.orthanc_id, s.series_uid, s.study_uid, "queued" if s.accepted else "ignored", now, now,
                     s.reason, json.dumps({"queued_at": now})))
                if cursor.rowcount == 0 and s.accepted:
                    cursor = self._db.execute(
                        "UPDATE series SET status = 'queued', attempts = 0, next_try = 0, updated = ?, message = ? "
                        "WHERE orthanc_id = ? AND status = 'ignored'", (now, s.reason, s.orthanc_id))
                added += cursor.rowcount
            self._db.execute("INSERT INTO feed (id, last_seq) VALUES (1, ?) "
                             "ON CONFLICT (id) DO UPDATE SET last_seq = excluded.last_seq", (last_seq,))
        return added

    def known(self, orthanc_id: str) -> bool:
        """Whether the series has a row that a new StableSeries does not change (any status but `ignored`)."""
        return self._db.execute("SELECT 1 FROM series WHERE orthanc_id = ? AND status != 'ignored'",
                                (orthanc_id,)).fetchone() is not None

    # --- workers ----------------------------------------------------------------------------
    def recover(self) -> int:
        """At start-up: every `running` series goes back to `queued` (its worker died). Returns how many."""
        with self._transaction():
            cursor = self._db.execute("UPDATE series SET status = 'queued', worker = '', updated = ? "
                                      "WHERE status = 'running'", (time.time(),))
        return cursor.rowcount

    def claim(self, worker: str, now: float | None = None) -> SeriesRow | None:
        """Take the oldest queued series whose next try is due: `running`, attempts + 1. None when none."""
        now = time.time() if now is None else now
        with self._transaction():
            row = self._db.execute(
                "UPDATE series SET status = 'running', attempts = attempts + 1, worker = ?, updated = ? "
                "WHERE orthanc_id = (SELECT orthanc_id FROM series WHERE status = 'queued' AND next_try <= ? "
                "ORDER BY received, orthanc_id LIMIT 1) RETURNING *", (worker, now, now)).fetchone()
        return _row(row) if row else None

    def finish(self, orthanc_id: str, status: str, message: str = "", results: list[str] | None = None,
               stages: dict[str, float] | None = None) -> None:
        """A worker's outcome: done, held or failed (final)."""
        if status not in ("done", "held", "failed"):
            raise ValueError(f"finish takes done, held or failed, not {status!r}")
        with self._transaction():
            self._db.execute(
                "UPDATE series SET status = ?, message = ?, results = ?, stages = ?, worker = '', updated = ? "
                "WHERE orthanc_id = ?",
                (status, message, json.dumps(results or []), json.dumps(stages or {}), time.time(), orthanc_id))

    def retry_later(self, orthanc_id: str, message: str, delay_s: float,
                    stages: dict[str, float] | None = None) -> None:
        """A failed try with tries left: back to `queued`, due after `delay_s`."""
        now = time.time()
        with self._transaction():
            self._db.execute(
                "UPDATE series SET status = 'queued', message = ?, next_try = ?, worker = '', updated = ?, "
                "stages = COALESCE(?, stages) WHERE orthanc_id = ?",
                (message, now + delay_s, now, json.dumps(stages) if stages is not None else None, orthanc_id))

    def requeue(self, orthanc_id: str) -> bool:
        """The operator's retry of a final series (failed, held, ignored, done): queued now, attempts 0."""
        with self._transaction():
            cursor = self._db.execute(
                "UPDATE series SET status = 'queued', attempts = 0, next_try = 0, updated = ?, message = 'requeued' "
                "WHERE orthanc_id = ? AND status IN ('done', 'held', 'failed', 'ignored')", (time.time(), orthanc_id))
        return cursor.rowcount == 1

    # --- operators ------------------------------------------------------------------------------
    def resolve(self, prefix: str) -> str:
        """The Orthanc series ID that `prefix` starts (the whole ID, or the 8 characters `status` shows).

        Raises LookupError with one line naming the candidates (ambiguous) or the fix (unknown)."""
        given = prefix.strip().lower()  # Orthanc IDs are lower-case hex (SHA-1 groups)
        if not given:
            raise LookupError("an empty series ID; give one from `python -m router status`")
        ids = [r["orthanc_id"] for r in self._db.execute(
            "SELECT orthanc_id FROM series WHERE substr(orthanc_id, 1, ?) = ? ORDER BY orthanc_id",
            (len(given), given))]
        if given in ids or len(ids) == 1:
            return given if given in ids else ids[0]
        if not ids:
            raise LookupError(f"{given}: no series of {self.path} starts with it; see the IDs in brackets in "
                              "`python -m router status` (or orthanc_id in `status --json`)")
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        raise LookupError(f"{given}: {len(ids)} series start with it ({shown}); give more characters")

    def rows(self, status: str | None = None) -> list[SeriesRow]:
        sql, args = "SELECT * FROM series", ()
        if status is not None:
            sql, args = sql + " WHERE status = ?", (status,)
        return [_row(r) for r in self._db.execute(sql + " ORDER BY received, orthanc_id", args)]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for r in self._db.execute("SELECT status, COUNT(*) AS n FROM series GROUP BY status"):
            out[r["status"]] = int(r["n"])
        return out

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): one writer at a time across threads and processes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _row(r: sqlite3.Row) -> SeriesRow:
    return SeriesRow(r["orthanc_id"], r["series_uid"], r["study_uid"], r["status"], int(r["attempts"]),
                     float(r["next_try"]), float(r["received"]), float(r["updated"]), r["worker"], r["message"],
                     json.loads(r["results"]), json.loads(r["stages"]))
