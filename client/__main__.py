"""python -m client: segment CT scans (NIfTI files, DICOM series, or a study pulled from a PACS over DICOMweb)
on one or several Triton servers and write their label maps (NIfTI, DICOM-SEG, Slicer seg.nrrd), statistics
and previews."""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path, PurePath

import numpy as np

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from client.cohort import MANIFEST_NAME, CohortLocked, CohortOptions, CohortSummary, Record, run_cohort
from client.inputs import DicomFormat, Discovery, NiftiFormat, discover
from client.outputs import (OUTPUT_TYPES, DicomSegWriter, NiftiLabelMapWriter, OutputError, OutputWriter,
                            QualityWriter, RtStructWriter, StructuredReportWriter, check_output_dir, make_writers,
                            plan_outputs)
from client.segmentation_client import SegmentationClient, SegmentationError
from clinical import structures
from clinical.seg_encodings import DEFAULT_ENCODING, ENCODINGS
from clinical.statistics import structure_labels
from wholebody.contract import RESOLUTIONS, VARIANTS

log = logging.getLogger("client")
MAX_JOBS = 64  # requests in flight per server: beyond this only threads and memory grow

EPILOG = f"""\
examples:
  python -m client ct.nii.gz                      # -> ./ct_seg.nii.gz, server on localhost:8001
  python -m client cohort/ -o labels/ --resolution lowres
        # cohort/s0001/ct.nii.gz -> labels/s0001/ct_seg.nii.gz, ...
  python -m client cohort/ -o labels/ -u gpu1:8001 -u gpu2:8001 --jobs 2
        # spread over two servers, two requests in flight on each
DICOM:
  python -m client study/ -o labels/ --output-type nifti,dicom-seg
        # one scan per CT series: labels/study/series3_seg.nii.gz and labels/study/series3_seg.dcm, ...
  python -m client study.zip --series-uid 1.2.840.113619.2.55.3.1234 -o labels/
        # only that series of the archive
Outputs, statistics, structure subsets, previews:
  python -m client ct.nii.gz --output-type nifti,seg-nrrd --statistics --preview
        # ct_seg.nii.gz, ct_seg.seg.nrrd (3D Slicer), ct_statistics.json/.csv, ct_preview.png
  python -m client ct.nii.gz --roi-subset liver spleen kidney_left kidney_right --statistics
        # every output and the statistics keep only these structures
Quality checks and DICOM SR (docs/quality-and-reports.md):
  python -m client study/ -o labels/ --quality-checks --quality-policy incomplete=mark,laterality=hold
        # labels/study/series3_quality.json, and the verdict in the manifest's "quality"
  python -m client study/ -o labels/ --sr   # series3_seg.dcm and its TID 1500 SR series3_seg_sr.dcm
  python -m client study/ -o labels/ --rtstruct   # series3_rtstruct.dcm: RT Structure Set for radiotherapy
PACS (DICOMweb: QIDO-RS/WADO-RS to pull, STOW-RS to store):
  python -m client --dicomweb http://pacs:8042/dicom-web --study 1.2.3.4 --store-seg -o labels/
        # pulls the study's CT series into a temporary folder (removed afterwards), segments each,
        # keeps labels/1.2.3.4/<series UID>/series<N>_seg.dcm and stores each DICOM-SEG in the study
  python -m client --dicomweb http://pacs:8042/dicom-web --study 1.2.3.4 --series 1.2.3.4.5 --store-seg \
      --seg-encoding binary   # a classic BINARY SEG, for a PACS or viewer older than the 2024 Label Map SEG

Inputs: .nii/.nii.gz files (any letter case), folders of DICOM files or .zip archives of them, and
folders, searched recursively. A folder whose own files include DICOM (also without preamble or
extension) is read with its sub-folders as one DICOM source; each CT series in it is a scan, single-
or multi-frame (enhanced) CT. Duplicates are dropped, images of another geometry (scouts, reformats)
set aside, other objects (MR, SEG, SR, RTSTRUCT, localizers) skipped: one line each, unless -q.
A file or series that cannot be read as a 3-D CT gets one line naming it and the reason (uneven
slice spacing, phases at one position, ...); the others go on. Padding (PixelPaddingValue, else
voxels below -2000 HU) is sent as it is, as dcm2niix passes it on; its share of each scan is
reported (manifest: padded_percent); --padding-to-air sends it as -1024 HU instead.
Outputs mirror the inputs' folders below their common folder, under -o, so two scans never share
an output (a DICOM source's series go to a folder named after it, as series<SeriesNumber>, or by
UID when numbers repeat); each file is written under a temporary name and renamed when complete.
The label map has the input's grid and affine, uint8 voxels: 0 = background, 1..104 = the
structures of clinical/structures.json (names, colours, SNOMED CT codes), which must equal the
server's label_names. Output types (--output-type, comma-separated, default nifti): {", ".join(OUTPUT_TYPES)};
dicom-seg only for DICOM inputs (it references the series' slices and joins its study).
Resume: rerunning the same command skips a scan only when all its outputs exist and the manifest says
they were made from this very input (its SHA-256; the DICOM series UID) with the same resolution and
network; a changed input, or another --resolution/--network, is segmented again. An existing output
made from another input (another cohort with the same layout) or of unknown origin is not replaced:
that scan fails with one line (--overwrite replaces it). One run at a time per -o folder: a second is
refused with a line naming the first. Every scan's outcome is appended to -o/{MANIFEST_NAME} (JSON
lines: input, input_sha256, series_uid, outputs, model, resolution, network, status
done/skipped/failed, server, seconds, error, padded_percent, missing_outputs, quality: the
verdict of --quality-checks). An output that cannot
be made for one scan (a DICOM-SEG of a series without UIDs: refused before its request) is named in
one line; the scan's other outputs are written and it counts as done, without all outputs (exit 1);
names, paths and folders of every output are checked before any request (too long, not writable:
exit 2). Symbolic links to folders are followed (loops searched once); every path not taken is named
in one line (errors always, the rest unless -q).
A disk or folder that cannot be written (full, read-only) stops the run with one line; finished
scans are kept. Ctrl-C or SIGTERM cancels the requests in flight (their shared memory is released)
and keeps finished scans: rerun the same command to resume.
Exit status: 0 if every scan was segmented or skipped (and stored, with --store-seg), 1 if any failed
or lacks an output (the others still run) or the run stopped, 2 on usage errors (bad -o, two scans
with one output, an output name or path too long or not writable, unknown structure names,
dicom-seg for NIfTI inputs, a server whose label names differ, another run writing to -o), found
before any request; 130 after Ctrl-C, 143 after SIGTERM.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Segment 104 anatomical structures in CT scans (NIfTI, DICOM, or a study on a PACS) with "
        "the wholeBody_ct_segmentation model served by Triton, and write label maps (NIfTI, DICOM-SEG, "
        "Slicer seg.nrrd), statistics and previews.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs", nargs="*", type=Path,
        help="NIfTI CT files (.nii/.nii.gz), DICOM folders or .zip files, or folders of them (none with --dicomweb)",
    )
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("."), help="where label maps go (default: .)")
    parser.add_argument("--suffix", default="_seg", help="added to the input's name for the output (default: _seg)")
    parser.add_argument(
        "-u", "--url", action="append", dest="urls", metavar="HOST:PORT",
        help="Triton gRPC endpoint; repeat to spread the scans over several servers (default: localhost:8001)",
    )
    parser.add_argument(
        "-j", "--jobs", type=int, default=1,
        help="requests in flight per server (default: 1; 2 keeps a server busy while the client reads and writes)",
    )
    parser.add_argument(
        "--resolution",
        choices=sorted(RESOLUTIONS),
        help="highres = 1.5 mm model (finer, ~8x the windows), lowres = 3.0 mm model; default: the server's",
    )
    parser.add_argument("--network", choices=VARIANTS, help="network variant to run; default: the server's")
    parser.add_argument(
        "--no-shared-memory",
        dest="shared_memory",
        action="store_false",
        default=None,
        help="send volumes inside gRPC messages even when the server is on this host "
        "(shared memory is used automatically for localhost/127.0.0.1)",
    )
    parser.add_argument(
        "--timeout", type=float, default=None, metavar="SECONDS",
        help="limit per scan's request, connecting included (default: none); a scan over it fails as "
        "'timed out' and the run goes on",
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="tries on other servers when a server fails (default: 2)"
    )
    outputs = parser.add_argument_group("outputs")
    outputs.add_argument(
        "--output-type", default="nifti", metavar="TYPES",
        help=f"comma-separated label-map outputs: {', '.join(OUTPUT_TYPES)} (default: nifti); dicom-seg for DICOM "
        "inputs only",
    )
    outputs.add_argument("--statistics", action="store_true",
                         help="per structure: voxels, volume (mL), mean/std/min/max HU; <name>_statistics.json/.csv")
    outputs.add_argument(
        "--roi-subset", nargs="+", metavar="NAME",
        help="keep only these structures (names as in clinical/structures.json, space- or comma-separated) in "
        "every output and the statistics",
    )
    outputs.add_argument(
        "--quality-checks", action="store_true",
        help="check each result (structure cut by the scan, fragments, laterality, volume against cited normal "
        "ranges, gaps in spine and ribs, HU range, padding): <name>_quality.json and a summary in the manifest",
    )
    outputs.add_argument(
        "--quality-policy", metavar="CHECK=ACTION,...",
        help="what a failed check does, hold | mark | report, e.g. incomplete=mark,laterality=hold (implies "
        "--quality-checks; the defaults: docs/quality-and-reports.md); a held result is not stored with --store-seg",
    )
    outputs.add_argument(
        "--sr", action="store_true",
        help="a DICOM SR (TID 1500) with each structure's volume and HU statistics and the quality checks, "
        "referencing the DICOM-SEG (implies dicom-seg; DICOM inputs only): <name>_seg_sr.dcm; stored with --store-seg",
    )
    outputs.add_argument(
        "--rtstruct", action="store_true",
        help="an RT Structure Set for radiotherapy planning: one ROI of per-slice contours per structure, named and "
        "coloured as in clinical/structures.json (DICOM inputs only): <name>_rtstruct.dcm; stored with --store-seg",
    )
    outputs.add_argument("--preview", action="store_true",
                         help="<name>_preview.png: three orthogonal CT slices with the labels overlaid")
    dicom = parser.add_argument_group("DICOM and PACS")
    dicom.add_argument("--series-uid", "--series", dest="series_uid", metavar="UID",
                       help="segment only this DICOM series (SeriesInstanceUID) of the DICOM inputs or the study")
    dicom.add_argument("--dicomweb", metavar="URL",
                       help="DICOMweb root of a PACS to pull the study from, e.g. http://pacs:8042/dicom-web")
    dicom.add_argument("--study-uid", "--study", dest="study_uid", metavar="UID",
                       help="StudyInstanceUID of the study to pull (with --dicomweb)")
    dicom.add_argument("--store-seg", action="store_true",
                       help="store each series' DICOM-SEG back in its study on the PACS (STOW-RS; implies dicom-seg)")
    dicom.add_argument(
        "--seg-encoding", choices=list(ENCODINGS), metavar="ENCODING",
        help=f"DICOM-SEG encoding, one of {', '.join(ENCODINGS)} (default: {DEFAULT_ENCODING}: the 2024 Label Map "
        "SOP class, small; 'binary' for viewers, PACS and pydicom-seg older than it; which reader opens which: "
        "docs/clinical-formats.md). An existing SEG is kept on resume: add --overwrite to rewrite it in another encoding",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of skipping them")
    parser.add_argument("--summary", action="store_true", help="print the voxel count of every structure found")
    parser.add_argument(
        "--padding-to-air", action="store_true",
        help="send padding voxels (PixelPaddingValue, else below -2000 HU) as -1024 HU (air) instead of as they are; "
        "the default, as they are, equals converting with dcm2niix then segmenting",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors and the closing summary")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also debug lines: every file skipped, the traceback of every failure")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s")
    for chatty in ("highdicom", "dicomweb_client"):  # an INFO line per copied DICOM module / per HTTP request
        logging.getLogger(chatty).setLevel(logging.WARNING)
    for ours in ("client", "clinical") if args.verbose else ():
        logging.getLogger(ours).setLevel(logging.DEBUG)
    if not 1 <= args.jobs <= MAX_JOBS or args.retries < 0 or (
            args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0)):
        parser.error(f"--jobs must be 1..{MAX_JOBS}, --retries >= 0 and --timeout a number of seconds > 0")
    if args.dicomweb and (args.inputs or not args.study_uid):
        parser.error("--dicomweb takes --study UID and no input paths")
    if not args.dicomweb and (args.study_uid or args.store_seg):
        parser.error("--study and --store-seg need --dicomweb URL")
    if not args.dicomweb and not args.inputs:
        parser.error("give input paths, or --dicomweb URL --study UID")
    output_types = [t.strip().lower() for t in args.output_type.split(",") if t.strip()]
    if (args.store_seg or args.sr) and "dicom-seg" not in output_types:
        output_types.append("dicom-seg")
    policy = None
    if args.quality_policy is not None:
        from clinical.quality import QualityPolicy

        try:
            policy = QualityPolicy.parse(args.quality_policy)
        except ValueError as exc:
            parser.error(f"--quality-policy: {exc}")
        args.quality_checks = True
    if args.seg_encoding and "dicom-seg" not in output_types:
        parser.error("--seg-encoding is for DICOM-SEG outputs: add --output-type dicom-seg (or --store-seg)")
    try:
        writers = make_writers(output_types, statistics=args.statistics, preview=args.preview,
                               seg_encoding=args.seg_encoding or DEFAULT_ENCODING, quality=args.quality_checks,
                               quality_policy=policy, sr=args.sr, rtstruct=args.rtstruct)
    except ValueError as exc:
        parser.error(str(exc))
    label_filter = None
    if args.roi_subset:
        requested = [name for item in args.roi_subset for name in item.split(",") if name.strip()]
        try:
            label_filter = subset_filter(requested)
        except ValueError as exc:
            log.error("error: --roi-subset: %s", exc)
            return 2
    urls = list(dict.fromkeys(args.urls or ["localhost:8001"]))
    try:
        check_output_dir(args.output_dir)
    except OutputError as exc:
        log.error("error: %s", exc)
        return 2
    formats = (NiftiFormat(), DicomFormat(series_uid=args.series_uid))
    if not args.dicomweb:
        found = discover(args.inputs, formats, exclude=[args.output_dir])
        return _segment(args, found, urls, writers, label_filter)
    from clinical.dicomweb import DicomWebError, pulled_study  # pydicom, dicomweb-client: only for a PACS

    try:
        with pulled_study(args.dicomweb, args.study_uid, args.series_uid) as folder:
            found = discover([folder], formats, exclude=[args.output_dir])
            # the temporary folder's name means nothing: outputs go under -o/<study UID>/<series UID>/
            found.scans[:] = [replace(s, relative=PurePath(args.study_uid, *s.relative.parts)) for s in found.scans]
            return _segment(args, found, urls, writers, label_filter)
    except DicomWebError as exc:
        log.error("error: %s", exc)
        return 1


def subset_filter(requested: Sequence[str]) -> Callable[[np.ndarray], np.ndarray]:
    """A label-map filter keeping only the structures named (clinical/structures.json names).

    Raises ValueError naming, for each unknown name, the closest valid ones (before any request)."""
    lookup = np.zeros(256, dtype=np.uint8)
    for label in structure_labels(requested, structures.label_names()):
        lookup[label] = label

    def keep(label_map: np.ndarray) -> np.ndarray:
        return lookup[label_map]

    return keep


def check_label_names(urls: Sequence[str], timeout_s: float | None) -> str | None:
    """None if every reachable server's label_names equal clinical/structures.json's names, else a
    one-line error. Unreachable servers are left to the cohort run (it reports them)."""
    ours = structures.label_names()
    for url in urls:
        try:
            with SegmentationClient(url, timeout_s=timeout_s) as seg:
                theirs = seg.label_names()
        except SegmentationError:
            continue
        if theirs != ours:
            at = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            got = theirs[at] if at < len(theirs) else "(none)"
            want = ours[at] if at < len(ours) else "(none)"
            return (f"server {url} names label {at} {got!r} where clinical/structures.json has {want!r} "
                    f"({len(theirs)} vs {len(ours)} labels): it serves another bundle; use a client of that "
                    "version or regenerate structures.json (python -m clinical.structures)")
    return None


def _segment(
    args: argparse.Namespace, found: Discovery, urls: list[str], writers: list[OutputWriter],
    label_filter: Callable[[np.ndarray], np.ndarray] | None,
) -> int:
    """Plan, check and run the cohort of `found`; store the DICOM-SEGs with --store-seg. Returns the exit status."""
    dicom_only = [flag for flag, kind in (("--output-type dicom-seg", DicomSegWriter), ("--rtstruct", RtStructWriter))
                  if any(isinstance(w, kind) for w in writers)]
    if dicom_only:
        not_dicom = [s for s in found.scans if s.series_uid is None]
        if not_dicom:
            log.error("error: %s %s DICOM inputs (it references the CT series), but %s "
                      "%s NIfTI; segment NIfTI files without it", " and ".join(dicom_only),
                      "needs" if len(dicom_only) == 1 else "need",
                      ", ".join(str(s.source) for s in not_dicom[:3])
                      + (f" and {len(not_dicom) - 3} more" if len(not_dicom) > 3 else ""),
                      "is" if len(not_dicom) == 1 else "are")
            return 2
    if args.series_uid and not any(s.series_uid == args.series_uid for s in found.scans):
        log.error("error: no CT series %s among the DICOM inputs; leave out --series-uid to list and segment "
                  "every series", args.series_uid)
        return 2
    try:
        plan = plan_outputs(found.scans, args.output_dir, writers, args.suffix)
    except OutputError as exc:
        log.error("error: %s", exc)
        return 2
    for problem in found.problems:
        log.error("error: %s", problem)
    for note in found.skipped:
        log.info("%s", note)
    if not plan:
        return 1
    if not all(isinstance(w, NiftiLabelMapWriter) for w in writers) or label_filter is not None:
        if (mismatch := check_label_names(urls, args.timeout)) is not None:
            log.error("error: %s", mismatch)
            return 2

    label_names: list[str] | None = None
    if args.summary:
        try:
            with SegmentationClient(urls[0], timeout_s=args.timeout) as seg:
                label_names = seg.label_names()
        except SegmentationError as exc:
            log.error("error: %s", exc)

    bar = tqdm(total=len(plan), unit="scan", disable=args.quiet or len(plan) < 2, file=sys.stderr)

    def report(record: Record) -> None:
        bar.update(1)
        if record.status == "failed" or record.error:  # a done scan's error: outputs it lacks
            log.error("error: %s", record.error)
            if record.status == "failed":
                return
        if args.quiet:
            return
        made = [p for p in record.outputs if p not in (record.missing_outputs or [])]
        outputs = ", ".join(os.path.relpath(p) if not os.path.isabs(p) else p for p in made)
        name = record.input + (f" (series {record.series_uid})" if record.series_uid else "")
        if record.status == "skipped":
            bar.write(f"{name}: skipped, {outputs} already made from this input (--overwrite replaces them)",
                      file=sys.stdout)
            return
        counts = record.label_counts or {}
        padded = (f", {record.padded_percent:g} % padding{' set to air' if args.padding_to_air else ''}"
                  if record.padded_percent else "")
        bar.write(f"{name} -> {outputs} ({len(counts)} structures, {record.server}{padded})", file=sys.stdout)
        if label_names is not None:
            for label, count in sorted(counts.items()):
                structure = label_names[label] if label < len(label_names) else str(label)
                bar.write(f"  {structure:<32} {count:>10,} voxels", file=sys.stdout)

    options = CohortOptions(
        output_dir=args.output_dir,
        resolution=args.resolution,
        network=args.network,
        overwrite=args.overwrite,
        jobs=args.jobs,
        timeout_s=args.timeout,
        use_shared_memory=args.shared_memory,
        max_attempts=1 + args.retries,
        counts=True,
        label_filter=label_filter,
        command=" ".join(["python -m client", *(args.argv or [])]),
        padding_to_air=args.padding_to_air,
        recipe=_recipe(args, writers),
    )
    try:
        with logging_redirect_tqdm(), _sigterm_as_interrupt() as signals:
            summary = run_cohort(plan, urls, options, writers, on_record=report)
    except KeyboardInterrupt:
        bar.close()
        how = "stopped by SIGTERM" if signals.got_sigterm else "interrupted"
        log.error("%s; requests in flight cancelled, finished scans kept: rerun the same command to resume", how)
        return 143 if signals.got_sigterm else 130
    except CohortLocked as exc:
        log.error("error: %s", exc)
        return 2
    finally:
        bar.close()
    if summary.stopped is not None:
        log.error("error: the run stopped: %s", summary.stopped)
    failed = summary.count("failed") + summary.incomplete + len(found.problems) + (summary.stopped is not None)
    if args.store_seg:
        failed += _store_segs(args.dicomweb, summary, writers)
    print(
        f"{summary.line()}{f'; {len(found.problems)} inputs not scans' if found.problems else ''}; "
        f"manifest: {args.output_dir / MANIFEST_NAME}",
        file=sys.stdout,
    )
    return 1 if failed else 0


def _recipe(args: argparse.Namespace, writers: list[OutputWriter]) -> dict[str, object]:
    """What besides model, resolution and network changes the outputs' content (CohortOptions.recipe)."""
    subset = sorted({n.strip() for item in args.roi_subset or [] for n in item.split(",") if n.strip()}) or None
    recipe: dict[str, object] = {"roi_subset": subset}
    if any(isinstance(w, DicomSegWriter) for w in writers):
        recipe["seg_encoding"] = args.seg_encoding or DEFAULT_ENCODING
    if any(isinstance(w, (QualityWriter, StructuredReportWriter)) for w in writers):
        recipe["quality_policy"] = args.quality_policy or "default"  # the verdict written depends on it
    if any(isinstance(w, RtStructWriter) for w in writers):
        from clinical.rtstruct import CONTOURS

        recipe["rtstruct_contours"] = CONTOURS  # how the contours follow the label map
    return recipe


class _Signals:
    got_sigterm = False


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[_Signals]:
    """While inside: SIGTERM (what `kill`, systemd and Kubernetes send) ends the run as Ctrl-C does,
    through KeyboardInterrupt in the main thread, so requests are cancelled and their regions released."""
    signals = _Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return

    def interrupt(signum: int, frame: object) -> None:
        signals.got_sigterm = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield signals
    finally:
        signal.signal(signal.SIGTERM, previous)


def _store_segs(url: str, summary: CohortSummary, writers: list[OutputWriter]) -> int:
    """STOW-RS the DICOM-SEG (and the SR with --sr, the RTSTRUCT with --rtstruct) of every scan segmented or
    skipped (a SEG stored again
    keeps its SOP Instance UID, so a rerun completes an interrupted store without duplicates), except those
    whose quality checks hold them back (one line each). Returns the number that failed."""
    from clinical.dicomweb import DicomWebError, store

    stored_kinds = (DicomSegWriter, StructuredReportWriter, RtStructWriter)
    indices = [i for i, w in enumerate(writers) if isinstance(w, stored_kinds)]
    checked = any(isinstance(w, (QualityWriter, StructuredReportWriter)) for w in writers)
    failed = stored = held = 0
    for record in summary.records:
        if record.status not in ("done", "skipped"):
            continue
        if checked and record.quality is None:  # checks asked for but not made: never store unchecked
            log.error("error: %s: its quality checks could not be made (%s): not stored", record.input,
                      record.error or "no verdict recorded")
            failed += 1
            continue
        if record.quality is not None and record.quality.get("held"):
            log.error("%s: held back by the quality policy (failed: %s): not stored; see its _quality.json",
                      f"series {record.series_uid}" if record.series_uid else record.input,
                      ", ".join(sorted(record.quality.get("failed", {}))))
            held += 1
            continue
        files = [record.outputs[i] for i in indices if record.outputs[i] not in (record.missing_outputs or [])]
        if not files:
            continue  # not made: its line was given
        try:
            store(url, files)
            stored += 1
        except DicomWebError as exc:
            log.error("error: %s: storing %s: %s", record.input, ", ".join(files), exc)
            failed += 1
    extra = [name for name, kind in (("SR", StructuredReportWriter), ("RTSTRUCT", RtStructWriter))
             if any(isinstance(w, kind) for w in writers)]
    kinds = " and ".join(["DICOM-SEG", *extra]) if len(extra) < 2 else "DICOM-SEG, SR and RTSTRUCT"
    print(f"stored the {kinds} of {stored} scan{'s' if stored != 1 else ''} on {url}"
          + (f"; {held} held back by the quality checks" if held else ""), file=sys.stdout)
    return failed


if __name__ == "__main__":
    sys.exit(main())
