"""python -m evaluation merge|evaluate: ground truth in the bundle's order, and Dice against it.

    python -m evaluation merge s0001/ -o s0001_labels.nii.gz
    python -m evaluation merge Totalsegmentator_dataset/ -o dataset/        # -> imagesTr/ + labelsTr/
    python -m evaluation evaluate dataset/ -o eval/ -u gpu1:8001 --resolution highres
    python -m evaluation evaluate dataset/ -o eval/ --compare network=torch_fp32 network=torch_amp
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clinical import structures
from wholebody.contract import RESOLUTIONS, VARIANTS

log = logging.getLogger("evaluation")

DEFAULT_URL = "localhost:8001"

MERGE_HELP = """\
Merge TotalSegmentator's per-structure masks into one uint8 label map in the bundle's order (labels 1..104
= TotalSegmentator v1's classes, clinical/structures.json), on ct.nii.gz's grid, written atomically.

SUBJECT is a folder holding ct.nii.gz and segmentations/<structure>.nii.gz (v1 or v2 names: v2 kept every
v1 name it still makes; v2-only masks such as heart or skull have no bundle label and are left out, see
evaluation/totalsegmentator_v2.json). Given a dataset root instead (sub-folders that are subjects), -o is a
folder that receives the layout `evaluate` reads: labelsTr/<subject>.nii.gz and imagesTr/<subject>.nii.gz
(a symbolic link to the subject's ct.nii.gz).

Reported: structures without a mask (label absent), empty masks, masks left out, overlapping pairs with
their voxel counts. A mask on another grid than ct.nii.gz stops the merge with one line naming it.

--overlap decides who gets a voxel claimed by several masks: smaller (default: the structure with fewer
voxels, so a vessel inside an organ or a thin structure along a large one keeps its boundary; independent of
the label order), later (the higher label: identical to TotalSegmentator's combine_masks_to_multilabel_file),
refuse (write nothing, exit 1).

examples:
  python -m evaluation merge s0001/ -o s0001_labels.nii.gz
  python -m evaluation merge Totalsegmentator_dataset/ -o dataset/ --report merge.json
"""

EVALUATE_HELP = """\
Segment a labelled dataset through the server(s) with the cohort client (python -m client's runner:
several -u, --jobs, retries, resume) and score every scan and structure against its ground truth with
MONAI: Dice and normalised surface Dice (NSD) at --nsd-tolerance mm.

DATASET is a folder with imagesTr/ and labelsTr/ (the model card's and nnU-Net's layout; image
<case>.nii.gz or <case>_0000.nii.gz, label <case>.nii.gz; imagesTs/labelsTs too), or a list file (.csv)
with one `image,label` line per scan. Labels are the bundle's values 0..104 on the image's grid.

Absent structures are explicit: in truth and prediction -> MONAI; missed (truth only) or spurious (prediction
only) -> Dice 0 and NSD 0; absent from both -> not scored (NaN), counted.

Outputs in -o: metrics.csv (variant, case, structure, case_kind, dice, nsd, voxel counts), structures.csv
(per structure: mean/median/quartiles, counts), evaluation.json (all of it, settings, per scan),
dice.png (per-structure Dice: box and points per variant), predictions/<variant>/ (the label maps; a rerun
re-scores them without segmenting again unless --overwrite), and with --compare comparison.csv.

--compare A B evaluates two variants on the same scans and adds a paired summary (B - A: mean difference
per structure and per scan, Wilcoxon signed-rank p). A variant is key=value[,key=value]: network=NAME
(--network's variants), url=HOST:PORT (repeatable: url=a:8001,url=b:8001), resolution=highres|lowres,
folder=PATH (label maps made elsewhere: <case>_seg.nii.gz or <case>.nii.gz), name=LABEL (names its outputs);
a bare variant name (torch_amp) means network=torch_amp. Unset keys take -u/--resolution/--network.

examples:
  python -m evaluation evaluate dataset/ -o eval/ -u gpu1:8001 -u gpu2:8001 --jobs 2
  python -m evaluation evaluate pairs.csv -o eval/ --structures liver spleen kidney_left kidney_right
  python -m evaluation evaluate dataset/ -o eval/ --compare network=torch_fp32 network=trt_fp16
  python -m evaluation evaluate dataset/ -o eval/ --compare folder=old_labels/ url=new-server:8001
"""


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (tests/test_docs.py parses the documented commands with it)."""
    parser = argparse.ArgumentParser(prog="python -m evaluation", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{merge,evaluate}")

    merge = sub.add_parser("merge", help="TotalSegmentator masks -> one label map in the bundle's order",
                           description=MERGE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    merge.add_argument("subject", type=Path, help="a subject folder (ct.nii.gz, segmentations/) or a dataset root")
    merge.add_argument("-o", "--output", type=Path, required=True,
                       help="label file (.nii.gz) for a subject; folder (imagesTr/, labelsTr/) for a dataset root")
    merge.add_argument("--overlap", choices=("smaller", "later", "refuse"), default="smaller",
                       help="who gets a voxel in several masks (default smaller; see above)")
    merge.add_argument("--report", type=Path, help="also write the report as JSON here")
    merge.add_argument("-q", "--quiet", action="store_true", help="print only errors and the closing line")

    ev = sub.add_parser("evaluate", help="segment a labelled dataset and score it (Dice, NSD) with MONAI",
                        description=EVALUATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("dataset", type=Path, help="folder with imagesTr/ + labelsTr/, or a .csv of image,label pairs")
    ev.add_argument("-o", "--output-dir", type=Path, required=True, help="where metrics, plot and predictions go")
    ev.add_argument("-u", "--url", action="append", help=f"server gRPC endpoint, repeatable (default {DEFAULT_URL})")
    ev.add_argument("--resolution", choices=sorted(RESOLUTIONS), help="model resolution; default: the server's")
    ev.add_argument("--network", choices=VARIANTS, help="network variant; default: the server's")
    ev.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two variants to compare (see above)")
    ev.add_argument("--predictions", type=Path, metavar="FOLDER",
                    help="score label maps already made (no server): same as one variant folder=FOLDER")
    ev.add_argument("--structures", nargs="+", metavar="NAME",
                    help="score only these structures (names of clinical/structures.json; comma or space separated)")
    ev.add_argument("--nsd-tolerance", type=float, default=3.0, metavar="MM",
                    help="normalised surface Dice tolerance in mm (default 3, TotalSegmentator's)")
    ev.add_argument("--jobs", type=int, default=1, help="requests in flight per server (default 1)")
    ev.add_argument("--score-workers", type=int, default=1, metavar="N",
                    help="scans scored at once in N processes (default 1: one thread); a whole-body map takes "
                         "about a minute of one core, more than a GPU server takes to segment it")
    ev.add_argument("--timeout", type=float, help="seconds per request (default: none)")
    ev.add_argument("--no-shared-memory", dest="shared_memory", action="store_false", default=None,
                    help="send volumes inside gRPC messages even to a server on this host")
    ev.add_argument("--overwrite", action="store_true", help="segment again even where predictions/ has a result")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `merge` or `evaluate`; returns the exit status (0 ok, 1 some scan/subject failed, 2 bad usage)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if args.command == "merge":
        return _merge(args)
    return _evaluate(args, list(argv) if argv is not None else sys.argv[1:])


def _merge(args: argparse.Namespace) -> int:
    from evaluation.merge import MergeError, subjects_under

    if not args.subject.is_dir():
        log.error("error: %s is not a folder; give a subject folder (ct.nii.gz, segmentations/) or a dataset root",
                  args.subject)
        return 2
    subjects = subjects_under(args.subject)
    if not subjects:
        log.error("error: %s: no ct.nii.gz in it or in its sub-folders; give a TotalSegmentator subject folder",
                  args.subject)
        return 2
    single = subjects == [args.subject]
    if (problem := _output_problem(args.output, args.report, single)) is not None:
        log.error("error: %s", problem)
        return 2
    reports, failed = [], 0
    try:
        for subject in tqdm(subjects, unit="subject", disable=args.quiet or single, file=sys.stderr):
            try:
                report = _merge_one(subject, args.output, single, args.overlap)
            except (MergeError, OSError) as exc:
                log.error("error: %s", exc)
                failed += 1
                continue
            reports.append(report)
            if not args.quiet:
                for line in report.lines():
                    tqdm.write(line, file=sys.stdout)
    except KeyboardInterrupt:  # the label being written was a temporary, removed by the atomic writer
        log.error("interrupted after %d of %d subjects (each written whole or not at all); rerun to finish",
                  len(reports) + failed, len(subjects))
        return 130
    if args.report is not None:
        from wholebody import atomic

        text = json.dumps([r.to_json() for r in reports], indent=1).encode()
        try:
            args.report.parent.mkdir(parents=True, exist_ok=True)
            atomic.atomic_write(args.report, lambda s: s.write(text))
        except OSError as exc:
            log.error("error: %s: the report cannot be written (%s); choose another --report", args.report,
                      exc.strerror or exc)
            failed += 1
    overlapping = sum(bool(r.overlaps) for r in reports)
    print(f"{len(reports)} merged, {failed} failed; {overlapping} with overlaps (rule {args.overlap})", file=sys.stdout)
    return 1 if failed else 0


def _output_problem(output: Path, report: Path | None, single: bool) -> str | None:
    """Why -o/--report cannot be used (checked before any subject is read), or None."""
    if single and output.is_dir():
        return f"-o {output} is a folder; for one subject give the label file, e.g. {output / 'labels.nii.gz'}"
    if single and not output.name.lower().endswith((".nii.gz", ".nii")):
        return f"-o {output}: a label file ends in .nii.gz (or .nii); e.g. {output.name}.nii.gz"
    if not single and output.exists() and not output.is_dir():
        return (f"-o {output} is a file; for a dataset root give a folder (it receives imagesTr/ and labelsTr/)")
    if report is not None and report.is_dir():
        return f"--report {report} is a folder; give a file name, e.g. {report / 'merge.json'}"
    return None


def _merge_one(subject: Path, output: Path, single: bool, rule: str) -> object:
    """Merge one subject; for a dataset root also link imagesTr/<subject>.nii.gz, so that the dataset never
    holds a label without its image or the reverse (a failed or interrupted merge removes a link it made)."""
    from evaluation.merge import merge_subject

    if single:
        return merge_subject(subject, output, rule)
    label = output / "labelsTr" / f"{subject.name}.nii.gz"
    link = output / "imagesTr" / f"{subject.name}.nii.gz"
    made = not link.is_symlink() and not link.exists()
    _link_image(subject, link)
    try:
        return merge_subject(subject, label, rule)
    except BaseException:
        if made and not label.exists():
            link.unlink(missing_ok=True)
        raise


def _link_image(subject: Path, link: Path) -> None:
    """imagesTr/<subject>.nii.gz -> the subject's ct.nii.gz (relative link, replaced if present)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath((subject / "ct.nii.gz").resolve(), link.parent.resolve())
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(target)


def _labels(names: Sequence[str] | None) -> tuple[int, ...] | str:
    """Label values of --structures, or a one-line error."""
    all_labels = tuple(range(1, len(structures.label_names())))
    if not names:
        return all_labels
    wanted = [n.strip() for item in names for n in item.split(",") if n.strip()]
    labels = []
    for name in wanted:
        try:
            labels.append(structures.by_name(name).label)
        except KeyError as exc:
            return f"--structures: {exc.args[0]}"
        if labels[-1] == 0:
            return "--structures: background is not a structure"
    return tuple(sorted(set(labels)))


def _evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    from client.__main__ import check_label_names
    from client.cohort import CohortLocked
    from evaluation.datasets import DatasetError, read_dataset
    from evaluation.evaluate import (
        EvaluationError,
        EvaluationOptions,
        EvaluationResult,
        ScanResult,
        evaluate_variant,
        parse_variant,
        variant_summary,
        write_outputs,
    )

    urls = args.url or [DEFAULT_URL]
    if args.output_dir.exists() and not args.output_dir.is_dir():
        log.error("error: -o %s is a file; give a folder for the metrics, plot and predictions", args.output_dir)
        return 2
    labels = _labels(args.structures)
    if isinstance(labels, str):
        log.error("error: %s", labels)
        return 2
    if args.jobs < 1 or args.score_workers < 1 or args.nsd_tolerance <= 0:
        log.error("error: --jobs and --score-workers must be at least 1, --nsd-tolerance above 0")
        return 2
    try:
        pairs = read_dataset(args.dataset)
        if args.compare and args.predictions:
            raise EvaluationError("--predictions and --compare together: write the folder as a variant, "
                                  "e.g. --compare folder=PREDICTIONS network=torch_amp")
        if args.compare:
            variants = [parse_variant(spec, urls, args.resolution, args.network) for spec in args.compare]
            if variants[0].name == variants[1].name:
                variants[1] = parse_variant(args.compare[1] + ",name=" + variants[1].name + "-b", urls, args.resolution,
                                            args.network)
        elif args.predictions:
            variants = [parse_variant(f"folder={args.predictions},name=predictions", urls)]
        else:
            variants = [parse_variant(f"name={args.network or 'default'}", urls, args.resolution, args.network)]
    except (DatasetError, EvaluationError) as exc:
        log.error("error: %s", exc)
        return 2
    served = sorted({u for v in variants for u in v.urls})
    if (down := _no_server(variants, args.timeout)) is not None:
        log.error("error: %s", down)
        return 2
    if served and (mismatch := check_label_names(served, args.timeout)) is not None:
        log.error("error: %s", mismatch)
        return 2
    options = EvaluationOptions(tolerance_mm=args.nsd_tolerance, labels=labels, jobs=args.jobs, timeout_s=args.timeout,
                                use_shared_memory=args.shared_memory, overwrite=args.overwrite,
                                score_workers=args.score_workers,
                                command=" ".join(["python -m evaluation", *argv]))
    results = []
    try:
        with logging_redirect_tqdm():
            for variant in variants:
                bar = tqdm(total=len(pairs), unit="scan", desc=variant.name, disable=args.quiet, file=sys.stderr)

                def progress(scan: ScanResult, bar: tqdm = bar) -> None:
                    bar.update(1)
                    if scan.error:
                        log.error("error: %s: %s", scan.case, scan.error)

                try:
                    results.append(evaluate_variant(pairs, variant, args.output_dir, options, progress))
                finally:
                    bar.close()
    except KeyboardInterrupt:
        log.error("interrupted; predictions made so far are kept: rerun the same command to resume")
        return 130
    except (EvaluationError, CohortLocked) as exc:
        log.error("error: %s", exc)
        return 2
    except OSError as exc:
        log.error("error: %s: %s; make room or fix the folder, then rerun", args.output_dir, exc)
        return 1
    result = EvaluationResult(str(args.dataset), options, results)
    if not any(s.error is None for v in results for s in v.scans):
        # e.g. no server answered: empty tables must not replace an earlier run's results in the same folder
        log.error("error: no scan was scored (each failed, see above); the outputs in %s were left as they were",
                  args.output_dir)
        return 1
    try:
        paths = write_outputs(result, args.output_dir)
    except OSError as exc:
        log.error("error: cannot write the outputs in %s: %s", args.output_dir, exc)
        return 1
    _print_summary(result, [variant_summary(v, options) for v in results])
    print("outputs: " + ", ".join(str(p) for p in paths.values()), file=sys.stdout)
    return 1 if any(s.error for v in results for s in v.scans) else 0


def _no_server(variants: Sequence[object], timeout_s: float | None) -> str | None:
    """A one-line error when no server of some variant answers (checked before anything is written in -o:
    a run that can segment nothing would only leave a manifest of failures there), else None. A variant
    with some servers down goes on: the cohort runner sends their scans to the others."""
    from client import SegmentationClient, SegmentationError

    answers: dict[str, str | None] = {}
    for variant in variants:
        urls = getattr(variant, "urls", ())
        for url in urls:
            if url not in answers:
                try:
                    with SegmentationClient(url, timeout_s=timeout_s if timeout_s is not None else 30.0) as seg:
                        seg.label_names()
                    answers[url] = None
                except SegmentationError as exc:
                    answers[url] = str(exc)
        if urls and all(answers[u] is not None for u in urls):
            return (f"variant {getattr(variant, 'name', '?')}: no server answers ({answers[urls[0]]}); start one "
                    f"or pass -u HOST:PORT (nothing was written)")
    return None


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print_summary(result: object, summaries: list[dict]) -> None:
    """The table on stdout: one row per variant; with two variants the paired comparison."""
    from evaluation.evaluate import EvaluationResult, compare, structure_summary

    assert isinstance(result, EvaluationResult)
    nsd_key = next(k for k in summaries[0] if k.startswith("mean_nsd_"))
    header = (f"{'variant':<24} {'scans':>5} {'failed':>6} {'structs':>7} {'mean Dice':>9} {'scan Dice':>9} "
              f"{'NSD':>6} {'missed':>6} {'spurious':>8} {'absent':>6} {'scans/min':>9}")
    print(header, file=sys.stdout)
    for s in summaries:
        print(f"{s['variant'][:24]:<24} {s['scored']:>5} {s['failed']:>6} {s['structures_scored']:>7} "
              f"{_fmt(s['mean_dice']):>9} {_fmt(s['mean_scan_dice']):>9} {_fmt(s[nsd_key], 3):>6} {s['missed']:>6} "
              f"{s['spurious']:>8} {s['absent']:>6} {_fmt(s['scans_per_minute'], 2):>9}", file=sys.stdout)
    print(f"(mean Dice: mean over structures of their mean over scans; scan Dice: mean over scans; "
          f"NSD at {result.options.tolerance_mm:g} mm)", file=sys.stdout)
    for v in result.variants:
        scored = [r for r in structure_summary(v) if r["dice_mean"] is not None]
        worst = sorted(scored, key=lambda r: r["dice_mean"])[:5]
        if worst:
            print(f"{v.variant.name}: lowest mean Dice: "
                  + ", ".join(f"{r['structure']} {r['dice_mean']:.3f}" for r in worst), file=sys.stdout)
    if len(result.variants) == 2:
        c = compare(*result.variants)
        p = "-" if c["wilcoxon_p"] is None else f"{c['wilcoxon_p']:.3g}"
        print(f"{c['b']} - {c['a']}: mean scan Dice difference {_fmt(c['mean_difference'], 5)} over {c['scans']} "
              f"paired scans (Wilcoxon p {p})", file=sys.stdout)
        moved = sorted(c["structures"], key=lambda r: -abs(r["mean_difference"]))[:5]
        if moved:
            print("largest per-structure differences: " + ", ".join(
                f"{r['structure']} {r['mean_difference']:+.4f} (n={r['pairs']})" for r in moved), file=sys.stdout)


if __name__ == "__main__":
    sys.exit(main())
