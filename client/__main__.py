"""python -m client: segment CT scans (NIfTI) on a Triton server and write their label maps."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from client.segmentation_client import (
    SegmentationClient,
    SegmentationError,
    is_nifti,
    output_path_for,
)
from wholebody.contract import RESOLUTIONS, VARIANTS

log = logging.getLogger("client")

EPILOG = """\
examples:
  python -m client ct.nii.gz                      # -> ./ct_seg.nii.gz, server on localhost:8001
  python -m client scans/ -o labels/ --resolution lowres
  python -m client ct.nii.gz -u gpu-box:8001 --network trt_fp16 --summary

The output has the input's grid, affine and header, uint8 voxels: 0 = background,
1..104 = the structures named by the server (see --summary). Each file is written under a
temporary name and renamed when complete, so a failed run never leaves a partial file.
Exit status: 0 if every file was segmented, 1 if any failed (the others still run), 2 on usage errors.
"""


def collect_inputs(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Expand folders to their NIfTI files; report paths that are neither."""
    files: list[Path] = []
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and is_nifti(p))
            if not found:
                problems.append(f"{path}: folder has no .nii or .nii.gz files")
            files += found
        elif path.exists() or is_nifti(path):
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


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
    parser.add_argument("-u", "--url", default="localhost:8001", help="Triton gRPC endpoint (default: localhost:8001)")
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
    parser.add_argument("--timeout", type=float, default=None, help="seconds to wait per scan (default: no limit)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--summary", action="store_true", help="print the voxel count of every structure found")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.INFO, format="%(message)s")
    files, problems = collect_inputs(args.inputs)
    for problem in problems:
        log.error("error: %s", problem)
    if not files:
        return 1
    failures = len(problems)
    with SegmentationClient(args.url, use_shared_memory=args.shared_memory, timeout_s=args.timeout) as seg:
        try:
            seg.check_ready()
            label_names = seg.label_names()
        except SegmentationError as exc:
            log.error("error: %s", exc)
            return 1
        bar = tqdm(files, unit="scan", disable=args.quiet or len(files) < 2, file=sys.stderr)
        for path in bar:
            bar.set_postfix_str(path.name)
            out = output_path_for(path, args.output_dir, args.suffix)
            if out.exists() and not args.overwrite:
                log.error("error: %s exists; pass --overwrite to replace it", out)
                failures += 1
                continue
            try:
                result = seg.segment_file(path, out, resolution=args.resolution, network=args.network)
            except SegmentationError as exc:
                log.error("error: %s", exc if str(exc).startswith(str(path)) else f"{path}: {exc}")
                failures += 1
                continue
            counts = result.voxel_counts(label_names)
            tqdm.write(f"{path} -> {out} ({len(counts)} structures)", file=sys.stdout)
            if args.summary:
                for name, count in counts.items():
                    tqdm.write(f"  {name:<32} {count:>10,} voxels", file=sys.stdout)
    if failures:
        log.error("%d of %d inputs failed", failures, len(files) + len(problems))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
