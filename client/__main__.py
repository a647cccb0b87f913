"""python -m client: segment CT scans (NIfTI) on one or several Triton servers and write their label maps."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from client.cohort import MANIFEST_NAME, CohortOptions, Record, run_cohort
from client.inputs import discover
from client.outputs import NiftiLabelMapWriter, OutputError, check_output_dir, plan_outputs
from client.segmentation_client import SegmentationClient, SegmentationError
from wholebody.contract import RESOLUTIONS, VARIANTS

log = logging.getLogger("client")

EPILOG = f"""\
examples:
  python -m client ct.nii.gz                      # -> ./ct_seg.nii.gz, server on localhost:8001
  python -m client cohort/ -o labels/ --resolution lowres
        # cohort/s0001/ct.nii.gz -> labels/s0001/ct_seg.nii.gz, ...
  python -m client cohort/ -o labels/ -u gpu1:8001 -u gpu2:8001 --jobs 2
        # spread over two servers, two requests in flight on each

Inputs: .nii/.nii.gz files (any letter case) and folders, searched recursively. A file that cannot
be read as a 3-D CT gets one line naming it and the reason; the others go on.
Outputs mirror the inputs' folders below their common folder, under -o, so two scans never share
an output; each file is written under a temporary name and renamed when complete. The label map
has the input's grid, affine and header, uint8 voxels: 0 = background, 1..104 = the structures
named by the server (see --summary).
Resume: rerunning the same command skips scans whose outputs exist (--overwrite replaces them).
Every scan's outcome is appended to -o/{MANIFEST_NAME} (JSON lines: input, outputs, status
done/skipped/failed, server, seconds, error).
Exit status: 0 if every scan was segmented or skipped, 1 if any failed (the others still run),
2 on usage errors (bad -o, two scans with one output), found before any request.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Segment 104 anatomical structures in CT scans with the wholeBody_ct_segmentation "
        "model served by Triton, and write the label maps as NIfTI.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="NIfTI CT files (.nii/.nii.gz) or folders of them")
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
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs instead of skipping them")
    parser.add_argument("--summary", action="store_true", help="print the voxel count of every structure found")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors and the closing summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s")
    if args.jobs < 1 or args.retries < 0 or (args.timeout is not None and args.timeout <= 0):
        parser.error("--jobs must be >= 1, --retries >= 0 and --timeout > 0")
    urls = list(dict.fromkeys(args.urls or ["localhost:8001"]))
    writers = [NiftiLabelMapWriter()]
    try:
        check_output_dir(args.output_dir)
        found = discover(args.inputs, exclude=[args.output_dir])
        plan = plan_outputs(found.scans, args.output_dir, writers, args.suffix)
    except OutputError as exc:
        log.error("error: %s", exc)
        return 2
    for problem in found.problems:
        log.error("error: %s", problem)
    if not plan:
        return 1

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
        if record.status == "failed":
            log.error("error: %s", record.error)
            return
        if args.quiet:
            return
        outputs = ", ".join(os.path.relpath(p) if not os.path.isabs(p) else p for p in record.outputs)
        if record.status == "skipped":
            bar.write(f"{record.input}: skipped, {outputs} exists (--overwrite replaces it)", file=sys.stdout)
            return
        counts = record.label_counts or {}
        bar.write(f"{record.input} -> {outputs} ({len(counts)} structures, {record.server})", file=sys.stdout)
        if label_names is not None:
            for label, count in sorted(counts.items()):
                name = label_names[label] if label < len(label_names) else str(label)
                bar.write(f"  {name:<32} {count:>10,} voxels", file=sys.stdout)

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
    )
    try:
        with logging_redirect_tqdm():
            summary = run_cohort(plan, urls, options, writers, on_record=report)
    except KeyboardInterrupt:
        log.error("interrupted; finished scans are kept: rerun the same command to resume")
        return 130
    finally:
        bar.close()
    failed = summary.count("failed") + len(found.problems)
    print(
        f"{summary.line()}{f'; {len(found.problems)} inputs not scans' if found.problems else ''}; "
        f"manifest: {args.output_dir / MANIFEST_NAME}",
        file=sys.stdout,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
