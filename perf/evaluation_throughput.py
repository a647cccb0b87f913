"""python -m perf.evaluation_throughput: scans per minute of `python -m evaluation evaluate` against the plain
cohort run (`client.cohort.run_cohort`, what `python -m client` runs) on the same scans and server.

One local server (CPU configs) serving the small test network (`init_filters=8`, random weights), a cohort
of synthetic CTs (`wholebody.sample_data.synthetic_ct`, 3 mm). In order, after one warm-up request:
1. plain: `run_cohort` of the cohort, NIfTI label maps out;
2. evaluate: `evaluation.evaluate.evaluate_variant` on the same scans, ground truth = the plain run's labels
   (every structure the network predicts is scored: the whole metric cost), segmenting again into a fresh
   folder, each scan scored while the server segments the next;
3. score only: the same evaluation from the plain run's folder (no server), the metrics' own cost.

`--large`: instead, the scoring cost of one large map alone (no server): TotalSegmentator's real masks of
`example_ct_sm` (`wholebody.sample_data.real_label_map`, 122x101x30 at 3 mm) upsampled by nearest neighbour
to 488x505x390 (~0.8 x 0.6 x 0.23 mm, the size of a whole-body CT), against itself shifted by one voxel
along X (every structure scored, Dice below 1).

Prints a markdown table naming the machine. On a shared box the numbers move with the other load.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from client.cohort import CohortOptions, run_cohort
from client.inputs import discover
from client.outputs import NiftiLabelMapWriter, plan_outputs
from client.segmentation_client import SegmentationClient
from evaluation.datasets import Pair
from evaluation.evaluate import EvaluationOptions, evaluate_variant, parse_variant, variant_summary
from perf.run import machine_info
from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.sample_data import synthetic_ct
from wholebody.triton_server import LocalTritonServer

log = logging.getLogger("perf.evaluation_throughput")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.evaluation_throughput", description=__doc__.split("\n")[0])
    parser.add_argument("--scans", type=int, default=6, help="cohort size (default 6)")
    parser.add_argument("--scan-shape", type=int, nargs=3, default=(40, 36, 30), metavar=("X", "Y", "Z"),
                        help="voxels of each CT at 3 mm (default 40 36 30)")
    parser.add_argument("--jobs", type=int, default=1, help="requests in flight (default 1)")
    parser.add_argument("--large", action="store_true", help="only the scoring cost of one large map (see above)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    info = machine_info()
    if args.large:
        return large(info)
    with tempfile.TemporaryDirectory(prefix="evaluation-throughput-") as tmp:
        work = Path(tmp)
        repo = copy_model_repository(work / "model_repository")
        install_bundle(make_test_bundle(work / "bundle", init_filters=8, seed=0), repo)
        images = work / "dataset" / "imagesTr"
        for i in range(args.scans):
            images.mkdir(parents=True, exist_ok=True)
            nib.save(synthetic_ct(tuple(args.scan_shape), (3.0, 3.0, 3.0), seed=i), images / f"s{i:04d}.nii.gz")
        scans = discover([images]).scans
        writers = [NiftiLabelMapWriter()]
        with LocalTritonServer(model_repository=repo) as server:
            url = server.grpc_url
            with SegmentationClient(url) as seg:  # warm-up: the first request of a stub loads its libraries
                volume = scans[0].read_volume()
                seg.segment(volume.array, volume.affine, resolution="lowres")
            plain_dir = work / "plain"
            summary = run_cohort(plan_outputs(scans, plain_dir, writers, "_seg"), [url],
                                 CohortOptions(output_dir=plain_dir, resolution="lowres", jobs=args.jobs), writers)
            if summary.count("done") != len(scans):
                raise RuntimeError(f"plain run: {summary.line()}")
            pairs = [Pair(s.relative.name, s.source, plain_dir / f"{s.relative.name}_seg.nii.gz") for s in scans]
            options = EvaluationOptions(jobs=args.jobs)
            served = evaluate_variant(pairs, parse_variant("name=evaluate", [url], "lowres"), work / "eval", options)
            scored = evaluate_variant(pairs, parse_variant(f"folder={plain_dir},name=score", [url]), work / "eval",
                                      options)
        rows = [("plain cohort run (python -m client)", len(scans), summary.wall_seconds)]
        for label, result in (("evaluate (segment + score)", served), ("score only (predictions folder)", scored)):
            s = variant_summary(result, options)
            if s["failed"] or (s["mean_dice"] is not None and abs(s["mean_dice"] - 1.0) > 1e-6):
                raise RuntimeError(f"{label}: {s}")
            rows.append((label, s["scored"], result.wall_seconds))
        structures = variant_summary(served, options)["structures_scored"]
    shape = "x".join(map(str, args.scan_shape))
    print(f"machine: {info['cpu']}, {info['cores']} cores; small test network (init_filters=8), lowres, CPU configs, "
          f"1 server, {args.jobs} request(s) in flight; {args.scans} synthetic CTs of {shape} at 3 mm; "
          f"{structures} structures scored (Dice + NSD at 3 mm); other work on this machine moves the numbers\n")
    print("| run | scans | wall s | scans per minute | vs plain |")
    print("|---|---|---|---|---|")
    plain_rate = 60 * rows[0][1] / rows[0][2]
    for label, n, wall in rows:
        rate = 60 * n / wall
        print(f"| {label} | {n} | {wall:.1f} | {rate:.2f} | {rate / plain_rate:.2f}x |")
    return 0


def large(info: dict) -> int:
    from clinical import structures
    from evaluation.metrics import score_label_maps
    from wholebody.sample_data import real_label_map

    small = np.asarray(real_label_map(structures.label_names()).dataobj)
    truth = small.repeat(4, axis=0).repeat(5, axis=1).repeat(13, axis=2)
    predicted = np.zeros_like(truth)
    predicted[1:] = truth[:-1]
    labels = list(range(1, len(structures.label_names())))
    start = time.perf_counter()
    scores = score_label_maps(predicted, truth, (0.75, 0.6, 0.23), labels)
    seconds = time.perf_counter() - start
    scored = [s for s in scores if s.case != "absent"]
    print(f"machine: {info['cpu']}, {info['cores']} cores; other work on this machine moves the numbers\n")
    print("| label map | structures scored | mean Dice | seconds to score (Dice + NSD at 3 mm) |")
    print("|---|---|---|---|")
    print(f"| {'x'.join(map(str, truth.shape))} uint8, real TotalSegmentator masks upsampled, shifted 1 voxel | "
          f"{len(scored)} | {np.mean([s.dice for s in scored]):.4f} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
