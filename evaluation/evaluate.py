"""Evaluate the served model on labelled scans: segment through the cohort client, score with MONAI, report.

    variants = [parse_variant("network=torch_fp32", ["gpu1:8001"]), parse_variant("network=torch_amp", ["gpu1:8001"])]
    result = evaluate(read_dataset(Path("dataset")), variants, Path("eval"), EvaluationOptions())
    write_outputs(result, Path("eval"))

Each variant (a server set, a network variant, a resolution, or a folder of predictions made elsewhere)
segments every image of the dataset with `client.cohort.run_cohort` (the same runner as `python -m client`:
several servers, requests in flight, retries, resume: a rerun re-scores without segmenting again) into
`<out>/predictions/<variant>/`. Each finished scan is scored while the servers work on the next ones
(`evaluation.metrics`: MONAI's Dice and normalised surface Dice per structure, absent structures decided
explicitly). Outputs (`write_outputs`): `metrics.csv` (one row per variant, scan and structure),
`structures.csv` (per variant and structure), `evaluation.json` (everything, with the paired comparison),
`dice.png` (per-structure Dice distributions, box and points per variant), and with two variants
`comparison.csv` (per-structure paired differences, Wilcoxon signed-rank p when scipy is present).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from client.cohort import CohortOptions, Record, run_cohort
from client.inputs import discover
from client.outputs import NiftiLabelMapWriter, atomic_write, plan_outputs
from clinical import structures
from evaluation.datasets import Pair
from evaluation.merge import same_grid, volume_shape
from evaluation.metrics import CASES, DEFAULT_TOLERANCE_MM, StructureScore, score_label_maps
from wholebody.contract import RESOLUTIONS, VARIANTS

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
SUFFIX = "_seg"  # the client's default output suffix
VARIANT_KEYS = ("network", "url", "resolution", "folder", "name")


class EvaluationError(ValueError):
    """A variant or scan cannot be evaluated; the message is one line naming it and the fix."""


@dataclass(frozen=True)
class Variant:
    """One way of getting predictions: `urls` with `network`/`resolution` (None: the server's default), or
    an existing `folder` of label maps. `name` names its outputs and its predictions folder."""

    name: str
    urls: tuple[str, ...] = ()
    network: str | None = None
    resolution: str | None = None
    folder: Path | None = None

    def describe(self) -> str:
        if self.folder is not None:
            return f"predictions in {self.folder}"
        return (f"{', '.join(self.urls)}, network {self.network or 'server default'}, "
                f"resolution {self.resolution or 'server default'}")


def parse_variant(spec: str, default_urls: Sequence[str], resolution: str | None = None,
                  network: str | None = None) -> Variant:
    """A variant from `key=value[,key=value...]` with keys network, url (repeatable), resolution, folder, name;
    a bare network variant name (`torch_amp`) means `network=torch_amp`. Unset keys take the defaults.

    Raises:
        EvaluationError: an unknown key, network or resolution, or a folder that does not exist.
    """
    values: dict[str, list[str]] = {}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        if not sep:
            key, value = "network", part
        key = key.strip().lower()
        if key not in VARIANT_KEYS:
            raise EvaluationError(f"variant {spec!r}: unknown key {key!r}; use {', '.join(VARIANT_KEYS)} "
                                  "(e.g. network=torch_amp or folder=predictions/)")
        values.setdefault(key, []).append(value.strip())
    net = values.get("network", [network])[-1]
    res = values.get("resolution", [resolution])[-1]
    if net is not None and net not in VARIANTS:
        raise EvaluationError(f"variant {spec!r}: unknown network {net!r}; choose one of {', '.join(VARIANTS)}")
    if res is not None and res not in RESOLUTIONS:
        raise EvaluationError(f"variant {spec!r}: unknown resolution {res!r}; choose one of {', '.join(RESOLUTIONS)}")
    folder = Path(values["folder"][-1]) if "folder" in values else None
    if folder is not None and not folder.is_dir():
        raise EvaluationError(f"variant {spec!r}: {folder} is not a folder; give the folder of predicted label maps")
    shown = [v for k in ("network", "url", "resolution", "folder") for v in values.get(k, [])]
    given = values.get("name", [None])[-1]
    if given is not None and (not re.fullmatch(r"[A-Za-z0-9_.-]+", given) or given in (".", "..")):
        # it names the folder <output>/predictions/<name>: "../x" or "a/b" would write outside it
        raise EvaluationError(f"variant {spec!r}: name {given!r} must be letters, digits, '_', '.' or '-' "
                              "(it names a folder of the output)")
    name = given or re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(shown)).strip("-") or "default"
    return Variant(name=name, urls=tuple(values.get("url", default_urls)) if folder is None else (),
                   network=net if folder is None else None, resolution=res if folder is None else None, folder=folder)


@dataclass(frozen=True)
class EvaluationOptions:
    tolerance_mm: float = DEFAULT_TOLERANCE_MM  # NSD tolerance
    labels: tuple[int, ...] = tuple(range(1, len(structures.label_names())))  # structures scored
    jobs: int = 1  # requests in flight per server
    timeout_s: float | None = None
    use_shared_memory: bool | None = None
    overwrite: bool = False  # segment again even when the predictions folder has this input's result
    max_attempts: int = 3
    command: str = ""
    # scans scored at once: 1 = one thread beside the cohort; N > 1 = N worker processes. A whole-body map
    # takes about a minute of one core to score (docs/evaluation.md), more than a GPU server takes to segment it
    score_workers: int = 1


@dataclass
class ScanResult:
    """One scan under one variant: its scores, or why it has none."""

    case: str
    image: str
    label: str
    prediction: str | None
    scores: list[StructureScore] = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None  # the server's request, s (None: from a folder, or skipped on resume)


@dataclass
class VariantResult:
    variant: Variant
    scans: list[ScanResult]
    wall_seconds: float  # segmenting and scoring, s
    segmented: int = 0  # scans segmented in this run (not resumed from the predictions folder)


@dataclass
class EvaluationResult:
    dataset: str
    options: EvaluationOptions
    variants: list[VariantResult]


def read_label_map(path: Path) -> nib.Nifti1Image:
    """A label map file (NIfTI, 3-D); EvaluationError naming the file when it cannot be read or is not one."""
    try:
        image = nib.load(path)
    except Exception as exc:  # nibabel raises many types for unreadable files
        raise EvaluationError(f"{path}: cannot be read as NIfTI ({exc}); replace the file") from None
    if len(volume_shape(image)) != 3:  # [X, Y, Z, 1] is taken as [X, Y, Z]
        raise EvaluationError(f"{path}: {len(image.shape)}-D image {list(image.shape)}; a label map is 3-D")
    return image


def label_values(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """[X, Y, Z] uint8 labels of `image`; EvaluationError when its values are not integers 0..104."""
    data = np.asanyarray(image.dataobj).reshape(volume_shape(image))
    top = len(structures.label_names()) - 1
    if data.dtype == np.uint8 and int(data.max(initial=0)) <= top:
        return data
    if not np.issubdtype(data.dtype, np.integer) and not np.array_equal(data, np.round(data)):
        raise EvaluationError(f"{path}: label values are not integers; a label map holds the bundle's labels 0..{top}")
    low, high = float(data.min(initial=0)), float(data.max(initial=0))
    if low < 0 or high > top:
        raise EvaluationError(f"{path}: labels {low:g}..{high:g} outside the bundle's 0..{top}; map them to the "
                              "bundle's order (clinical/structures.json; python -m evaluation merge for "
                              "TotalSegmentator masks)")
    return data.astype(np.uint8)


def score_scan(prediction: Path, truth: Path, options: EvaluationOptions) -> list[StructureScore]:
    """Scores of `prediction` against `truth` (both label map files on one grid).

    Raises:
        EvaluationError: a file unreadable or not a label map, or the two grids differ (shape or affine).
    """
    truth_image, predicted_image = read_label_map(truth), read_label_map(prediction)
    if not same_grid(truth_image, predicted_image):
        raise EvaluationError(
            f"{truth}: grid {list(truth_image.shape)} / affine {np.round(truth_image.affine[:3], 3).tolist()} differs "
            f"from the prediction's {list(predicted_image.shape)} / {np.round(predicted_image.affine[:3], 3).tolist()} "
            f"({prediction}); the ground truth must be on its image's grid")
    spacing = [float(z) for z in predicted_image.header.get_zooms()[:3]]
    return score_label_maps(label_values(predicted_image, prediction), label_values(truth_image, truth), spacing,
                            options.labels, options.tolerance_mm)


def _folder_prediction(folder: Path, pair: Pair) -> Path | None:
    """The prediction of `pair` in a folder made elsewhere: `<case>_seg.nii.gz` or `<image name>_seg.nii.gz`
    (python -m client's name), `<case>.nii.gz` (nnU-Net's) or `<image name>_trans.nii.gz` (the MONAI bundle's
    own inference, SaveImaged's postfix "trans", in a sub-folder per image), .nii too; in the folder, else below."""
    image_stem = re.sub(r"\.nii(\.gz)?$", "", pair.image.name, flags=re.IGNORECASE)
    stems = [f"{pair.case}{SUFFIX}", f"{image_stem}{SUFFIX}", pair.case, f"{image_stem}_trans"]
    names = [f"{stem}{end}" for stem in dict.fromkeys(stems) for end in (".nii.gz", ".nii")]
    for name in names:
        if (folder / name).is_file():
            return folder / name
    for name in names:
        found = sorted(folder.rglob(name))
        if found:
            return found[0]
    return None


class _Scorer:
    """Scores scans as their predictions arrive, off the caller's thread: one thread (`workers` 1), or
    `workers` processes (started with "spawn": the cohort's gRPC threads make fork unsafe), each scoring one
    scan at a time. `submit` and `fail` return at once; `wait` blocks until every scan is settled."""

    def __init__(self, pairs: Sequence[Pair], options: EvaluationOptions,
                 progress: Callable[[ScanResult], None] | None) -> None:
        self.results = {p.case: ScanResult(p.case, str(p.image), str(p.label), None) for p in pairs}
        self.labels = {p.case: p.label for p in pairs}
        self.options, self.progress = options, progress
        self.lock = threading.Lock()
        self.futures: list[Future] = []
        self.stopped = False
        if options.score_workers > 1:
            import multiprocessing

            self.pool: Executor = ProcessPoolExecutor(options.score_workers, initializer=_ignore_interrupts,
                                                      mp_context=multiprocessing.get_context("spawn"))
        else:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")

    def submit(self, case: str, prediction: Path, seconds: float | None) -> None:
        result = self.results[case]
        result.prediction, result.seconds = str(prediction), seconds
        future = self.pool.submit(score_scan, prediction, self.labels[case], self.options)
        future.add_done_callback(lambda done: self._settle(case, done))
        with self.lock:
            self.futures.append(future)

    def _settle(self, case: str, done: Future) -> None:
        if self.stopped:  # interrupted: the scans cancelled or cut off are not failures to report
            return
        result = self.results[case]
        try:
            result.scores = done.result()
        except EvaluationError as exc:
            result.error = str(exc)
        except Exception as exc:  # one scan's failure must not cost the others; the line names it
            log.debug("scoring %s failed", case, exc_info=True)
            result.error = f"{result.prediction}: scoring failed: {exc}"
        self._report(result)

    def fail(self, case: str, error: str) -> None:
        self.results[case].error = error
        self._report(self.results[case])

    def _report(self, result: ScanResult) -> None:
        if self.progress is not None:
            with self.lock:
                self.progress(result)

    def wait(self, cancel: bool = False) -> None:
        """Block until the scans submitted are settled (`cancel`: those not started are dropped). Interrupted
        (Ctrl-C), the workers are stopped (`stop`) and KeyboardInterrupt goes on."""
        try:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
        except KeyboardInterrupt:
            self.stop()
            raise
        with self.lock:
            futures = list(self.futures)
        for future in futures:  # the done-callbacks have run: futures are settled before shutdown returns
            future.exception()


    def stop(self) -> None:
        """Drop the scans not started and end the worker processes now (after Ctrl-C). Without this an
        interrupted pool of processes kept the interpreter waiting for them at exit, for ever (seen with
        --score-workers 2). A scoring thread cannot be stopped: it finishes its scan (at most ~1 min)."""
        self.stopped = True
        # no public way before Python 3.14 (terminate_workers); shutdown() forgets them, so take them first
        processes = list((getattr(self.pool, "_processes", None) or {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=10)


def _ignore_interrupts() -> None:
    """Scoring processes leave Ctrl-C to the main process (which stops them): the terminal sends SIGINT to
    the whole process group, and each worker would print its own traceback."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def evaluate_variant(pairs: Sequence[Pair], variant: Variant, out_dir: Path, options: EvaluationOptions,
                     progress: Callable[[ScanResult], None] | None = None) -> VariantResult:
    """Segment (unless `variant.folder`) and score every pair; scans are scored as their results arrive,
    while the servers segment the next ones (`options.score_workers` at a time).

    Raises:
        EvaluationError: the images cannot be planned (outputs colliding), or the run stopped.
        client.cohort.CohortLocked: another run writes the same predictions folder.
        KeyboardInterrupt: after the requests in flight were cancelled.
    """
    start = time.monotonic()
    scorer = _Scorer(pairs, options, progress)
    segmented = 0
    try:
        if variant.folder is not None:
            for pair in pairs:
                prediction = _folder_prediction(variant.folder, pair)
                if prediction is None:
                    scorer.fail(pair.case, f"{variant.folder}: no prediction for {pair.case} ({pair.case}{SUFFIX}"
                                           f".nii.gz or {pair.case}.nii.gz); segment {pair.image} into it")
                else:
                    scorer.submit(pair.case, prediction, None)
        else:
            segmented = _segment(pairs, variant, out_dir / PREDICTIONS / variant.name, options, scorer)
    except KeyboardInterrupt:
        scorer.stop()
        raise
    except BaseException:
        scorer.wait(cancel=True)
        raise
    scorer.wait()
    return VariantResult(variant, [scorer.results[p.case] for p in pairs], time.monotonic() - start, segmented)


def _segment(pairs: Sequence[Pair], variant: Variant, pred_dir: Path, options: EvaluationOptions,
             scorer: _Scorer) -> int:
    """Segment the pairs' images through `variant`'s servers with the cohort runner, handing each finished
    scan to `scorer`. Returns the number of scans segmented (not resumed)."""
    # one image may be the image of several cases (a list file scoring two readers' labels of one CT): it is
    # segmented once and its prediction scored against each case's label
    cases_of: dict[str, list[str]] = {}
    for pair in pairs:
        cases_of.setdefault(os.path.realpath(pair.image), []).append(pair.case)
    found = discover(list(dict.fromkeys(p.image for p in pairs)))
    scans_of: dict[str, list] = {}
    for scan in found.scans:
        for case in cases_of.get(os.path.realpath(scan.source), []):
            scans_of.setdefault(case, []).append(scan)
    scans: list = []
    for pair in pairs:
        got = scans_of.get(pair.case, [])
        if len(got) != 1:
            problem = next((p for p in found.problems if str(pair.image) in p), None)
            scorer.fail(pair.case, problem or f"{pair.image}: {len(got)} CT scans in it; an image must be one CT (a "
                                              "NIfTI file or a folder of one DICOM series)")
        elif not any(got[0] is scan for scan in scans):
            scans.append(got[0])
    if not scans:
        return 0
    writers = [NiftiLabelMapWriter()]
    try:
        plan = plan_outputs(scans, pred_dir, writers, SUFFIX)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    cases_of_output = {str(paths[0]): cases_of[os.path.realpath(scan.source)] for scan, paths in plan.items()}
    cohort_options = CohortOptions(
        output_dir=pred_dir, resolution=variant.resolution, network=variant.network, overwrite=options.overwrite,
        jobs=options.jobs, timeout_s=options.timeout_s, use_shared_memory=options.use_shared_memory,
        max_attempts=options.max_attempts, command=options.command)

    def on_record(record: Record) -> None:
        for case in cases_of_output[record.outputs[0]]:
            if record.status in ("done", "skipped") and not record.missing_outputs:
                scorer.submit(case, Path(record.outputs[0]), record.seconds if record.status == "done" else None)
            else:
                scorer.fail(case, record.error or f"{record.input}: not segmented")

    summary = run_cohort(plan, list(variant.urls), cohort_options, writers, on_record=on_record)
    if summary.stopped is not None:
        raise EvaluationError(f"the run stopped: {summary.stopped}")
    return summary.count("done")


# --- summaries ---------------------------------------------------------------------------------------------


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    v = np.asarray([x for x in values if not math.isnan(x)], float)
    if not v.size:
        return {"n": 0, "mean": None, "median": None, "std": None, "q1": None, "q3": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()), "median": float(np.median(v)), "std": float(v.std()),
            "q1": float(np.percentile(v, 25)), "q3": float(np.percentile(v, 75)), "min": float(v.min()),
            "max": float(v.max())}


def structure_summary(result: VariantResult) -> list[dict[str, Any]]:
    """Per structure of one variant: Dice and NSD statistics over the scans where it is scored, and the
    count of each case (`evaluation.metrics.CASES`)."""
    names = structures.label_names()
    rows = []
    by_label: dict[int, list[StructureScore]] = {}
    for scan in result.scans:
        for s in scan.scores:
            by_label.setdefault(s.label, []).append(s)
    for label, scores in sorted(by_label.items()):
        dice, nsd = _stats([s.dice for s in scores]), _stats([s.nsd for s in scores])
        row: dict[str, Any] = {"label": label, "structure": names[label], "scored": dice["n"]}
        row.update({f"dice_{k}": v for k, v in dice.items() if k != "n"})
        row.update({f"nsd_{k}": v for k, v in nsd.items() if k != "n"})
        row.update({case: sum(s.case == case for s in scores) for case in CASES})
        rows.append(row)
    return rows


def scan_mean_dice(scan: ScanResult, labels: set[int] | None = None) -> float:
    """Mean Dice of one scan over its scored structures (optionally only `labels`); NaN when none."""
    values = [s.dice for s in scan.scores if not math.isnan(s.dice) and (labels is None or s.label in labels)]
    return float(np.mean(values)) if values else math.nan


def variant_summary(result: VariantResult, options: EvaluationOptions) -> dict[str, Any]:
    """The headline numbers of one variant."""
    ok = [s for s in result.scans if s.error is None]
    rows = structure_summary(result)
    means = [r["dice_mean"] for r in rows if r["dice_mean"] is not None]
    nsd_means = [r["nsd_mean"] for r in rows if r["nsd_mean"] is not None]
    scans = [scan_mean_dice(s) for s in ok]
    counts = {case: sum(r[case] for r in rows) for case in CASES}
    return {
        "variant": result.variant.name, "how": result.variant.describe(), "scans": len(result.scans),
        "scored": len(ok), "failed": len(result.scans) - len(ok), "segmented": result.segmented,
        "structures_scored": len(means),
        "mean_dice": float(np.mean(means)) if means else None,  # mean over structures of their mean
        "mean_scan_dice": _stats(scans)["mean"],  # mean over scans of their mean
        f"mean_nsd_{options.tolerance_mm:g}mm": float(np.mean(nsd_means)) if nsd_means else None,
        **counts, "wall_seconds": round(result.wall_seconds, 3),
        "scans_per_minute": round(60 * len(ok) / result.wall_seconds, 3) if result.wall_seconds > 0 else None,
    }


def _wilcoxon(differences: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p of paired differences (scipy.stats.wilcoxon); None when scipy is
    absent, fewer than two pairs differ, or all differences are zero (no test possible)."""
    d = [x for x in differences if x != 0]
    if len(d) < 2:
        return None
    try:
        from scipy.stats import wilcoxon
    except ImportError:
        return None
    try:
        return float(wilcoxon(d).pvalue)
    except ValueError:
        return None


def compare(a: VariantResult, b: VariantResult) -> dict[str, Any]:
    """Paired comparison of two variants on the same scans: B - A.

    Per structure: the scans where both variants have a Dice (not `absent` on either side), the mean and
    median difference and the Wilcoxon p. Overall: per scan, the mean Dice over the structures scored in both
    variants, paired over scans scored by both.
    """
    names = structures.label_names()
    a_scans, b_scans = {s.case: s for s in a.scans if s.error is None}, {s.case: s for s in b.scans if s.error is None}
    cases = sorted(set(a_scans) & set(b_scans))
    per_structure: dict[int, list[tuple[float, float]]] = {}
    per_scan = []
    for case in cases:
        da = {s.label: s.dice for s in a_scans[case].scores if not math.isnan(s.dice)}
        db = {s.label: s.dice for s in b_scans[case].scores if not math.isnan(s.dice)}
        common = sorted(set(da) & set(db))
        for label in common:
            per_structure.setdefault(label, []).append((da[label], db[label]))
        if common:
            per_scan.append((case, float(np.mean([da[x] for x in common])), float(np.mean([db[x] for x in common]))))
    rows = []
    for label, values in sorted(per_structure.items()):
        diffs = [y - x for x, y in values]
        rows.append({"label": label, "structure": names[label], "pairs": len(values),
                     f"mean_dice_{a.variant.name}": float(np.mean([x for x, _ in values])),
                     f"mean_dice_{b.variant.name}": float(np.mean([y for _, y in values])),
                     "mean_difference": float(np.mean(diffs)), "median_difference": float(np.median(diffs)),
                     "wilcoxon_p": _wilcoxon(diffs)})
    diffs = [y - x for _, x, y in per_scan]
    return {
        "a": a.variant.name, "b": b.variant.name, "difference": "b - a", "scans": len(per_scan),
        "mean_scan_dice_a": float(np.mean([x for _, x, _ in per_scan])) if per_scan else None,
        "mean_scan_dice_b": float(np.mean([y for _, _, y in per_scan])) if per_scan else None,
        "mean_difference": float(np.mean(diffs)) if diffs else None,
        "wilcoxon_p": _wilcoxon(diffs), "per_scan": [{"case": c, "a": x, "b": y} for c, x, y in per_scan],
        "structures": rows,
    }


# --- outputs -----------------------------------------------------------------------------------------------


def _csv_text(rows: Sequence[dict[str, Any]]) -> bytes:
    import csv

    stream = io.StringIO()
    if rows:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                             for k, v in row.items()})
    return stream.getvalue().encode()


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def metric_rows(result: EvaluationResult) -> list[dict[str, Any]]:
    """metrics.csv: one row per variant, scan and structure scored or absent."""
    names = structures.label_names()
    rows = []
    for v in result.variants:
        for scan in v.scans:
            for s in scan.scores:
                rows.append({"variant": v.variant.name, "case": scan.case, "structure": names[s.label],
                             "label": s.label, "case_kind": s.case, "dice": s.dice, "nsd": s.nsd,
                             "truth_voxels": s.truth_voxels, "predicted_voxels": s.predicted_voxels})
    return rows


def write_outputs(result: EvaluationResult, out_dir: Path) -> dict[str, Path]:
    """Write metrics.csv, structures.csv, evaluation.json, dice.png (and comparison.csv for two variants)
    atomically into `out_dir`; every file's bytes are made before the first is written, so a failure while
    making them (the plot, say) leaves an earlier run's set as it was. Returns name -> path.

    Raises:
        OSError: a file cannot be written.
    """
    structure_rows = [{"variant": v.variant.name, **row} for v in result.variants for row in structure_summary(v)]
    comparison = compare(*result.variants) if len(result.variants) == 2 else None
    document = {
        "dataset": result.dataset,
        "machine": socket.gethostname(),
        "settings": {"nsd_tolerance_mm": result.options.tolerance_mm, "structures": len(result.options.labels),
                     "cases": {"both": "Dice and NSD by MONAI", "missed": "in truth only: Dice 0, NSD 0",
                               "spurious": "predicted only: Dice 0, NSD 0",
                               "absent": "in neither: NaN, left out of means, counted"}},
        "variants": [{**variant_summary(v, result.options), "variant_spec": asdict(v.variant),
                      "structures": structure_summary(v),
                      "per_scan": [{"case": s.case, "image": s.image, "label": s.label, "prediction": s.prediction,
                                 "error": s.error, "seconds": s.seconds, "mean_dice": scan_mean_dice(s)}
                                for s in v.scans]}
                     for v in result.variants],
        "comparison": comparison,
    }
    contents = {"metrics.csv": _csv_text(metric_rows(result)), "structures.csv": _csv_text(structure_rows)}
    if comparison is not None:
        contents["comparison.csv"] = _csv_text(comparison["structures"])
    contents["evaluation.json"] = json.dumps(_json_safe(document), indent=1, allow_nan=False).encode()
    contents["dice.png"] = plot_png(result)
    paths = {name: out_dir / name for name in contents}
    for name, data in contents.items():
        atomic_write(paths[name], lambda stream, data=data: stream.write(data))
    if comparison is None:  # an earlier --compare run's table would contradict this run's evaluation.json
        (out_dir / "comparison.csv").unlink(missing_ok=True)
    return paths


def plot_png(result: EvaluationResult) -> bytes:
    """PNG bytes of the per-structure Dice distributions: one row per structure scored in any variant (label
    order, top to bottom), a box (quartiles, whiskers 1.5 IQR) and the scans as points per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = structures.label_names()
    per_variant = []
    for v in result.variants:
        values: dict[int, list[float]] = {}
        for scan in v.scans:
            for s in scan.scores:
                if not math.isnan(s.dice):
                    values.setdefault(s.label, []).append(s.dice)
        per_variant.append(values)
    labels = sorted({label for values in per_variant for label in values})
    k = len(result.variants)
    height = max(3.0, 0.22 * len(labels) * max(1.0, 0.7 * k) + 1.6)
    fig, ax = plt.subplots(figsize=(9, height), dpi=100)
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / k
    rng = np.random.default_rng(0)
    for i, values in enumerate(per_variant):
        offset = (i - (k - 1) / 2) * width
        rows = [(y, values[label]) for y, label in enumerate(labels) if label in values]
        if not rows:
            continue
        positions = [y + offset for y, _ in rows]
        style = {"positions": positions, "widths": width * 0.8, "showfliers": False, "patch_artist": True,
                 "boxprops": {"facecolor": (*colors[i % 10], 0.25), "edgecolor": colors[i % 10]},
                 "medianprops": {"color": colors[i % 10]}, "whiskerprops": {"color": colors[i % 10]},
                 "capprops": {"color": colors[i % 10]}, "manage_ticks": False}
        try:  # matplotlib >= 3.10 names it orientation; `vert` is deprecated from 3.11
            ax.boxplot([v for _, v in rows], orientation="horizontal", **style)
        except TypeError:
            ax.boxplot([v for _, v in rows], vert=False, **style)
        for pos, (_, v) in zip(positions, rows):
            ax.scatter(v, pos + rng.uniform(-width * 0.3, width * 0.3, len(v)), s=6, color=colors[i % 10], alpha=0.7,
                       linewidths=0, label=None)
        ax.scatter([], [], s=20, color=colors[i % 10], label=result.variants[i].variant.name)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels([names[label] for label in labels], fontsize=7)
    ax.set_ylim(max(len(labels), 1) - 0.5, -0.5)  # no structure scored (absent everywhere): an empty axis, no warning
    if not labels:
        ax.text(0.5, 0, "no structure present in any ground truth or prediction", ha="center", va="center")
    ax.set_xlim(-0.02, 1.02)
    ax.set_xlabel("Dice")
    ax.grid(axis="x", alpha=0.3)
    scans = max((sum(s.error is None for s in v.scans) for v in result.variants), default=0)
    ax.set_title(f"Dice per structure, {scans} scans of {Path(result.dataset).name}", fontsize=10)
    if labels:  # variants put a point in the legend only when they have a structure to show
        ax.legend(loc="lower left", fontsize=8, frameon=True)
    fig.tight_layout()
    stream = io.BytesIO()
    fig.savefig(stream, format="png")
    plt.close(fig)
    return stream.getvalue()
