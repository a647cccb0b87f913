"""The inversion's cost and agreement on a realistic size, against MONAI's own resampler.

    python -m perf.inversion                       # 512x512x400 output, three affine kinds
    python -m perf.inversion --shape 256 256 200   # smaller

For each affine kind of the input (axis-aligned, float32-noisy "nearly aligned", oblique, gantry
tilt) it resamples random labels from the 1.5 mm grid that
Orientation(RAS) + Spacing make of the input to the input grid, once with
`wholebody.postprocessing.resample_nearest` and once with MONAI's `SpatialResample(nearest, border,
float64)` as `Invertd(nearest_interp=True)` calls it, each in a fresh process. Time is the call's
wall time; memory is the process's peak RSS (ru_maxrss) minus its RSS just before the call. The
labels of the two are compared voxel for voxel. The path column says which way ours went: separable
where MONAI's transform between the two grids has exact zero off-diagonals, sampled otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from perf.run import machine_info

log = logging.getLogger("perf.inversion")

KINDS = ("axis-aligned (LPS)", "nearly aligned (float32 noise)", "oblique (20 deg)", "gantry tilt (15 deg)")


def input_affine(kind: str, spacing: tuple[float, float, float]) -> np.ndarray:
    """The input CT's affine for one affine kind (voxel -> RAS mm)."""
    matrix = np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)
    if kind == KINDS[1]:
        matrix = (matrix + 3e-8 * np.array([[0, 1, -1], [-1, 0, 1], [1, -1, 0]])).astype(np.float32).astype(np.float64)
    elif kind == KINDS[2]:
        c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
        matrix = (
            np.array([[1.0, 0, 0], [0, c, -s], [0, s, c]]) @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ matrix
        )
    elif kind == KINDS[3]:
        t = math.radians(15)
        matrix[:, 2] = [0.0, spacing[2] * math.sin(t), spacing[2] * math.cos(t)]
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = matrix, (180.25, 170.5, -301.0)
    return affine


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def run_child(kind: str, impl: str, shape: tuple[int, int, int], out: Path) -> dict[str, float]:
    """In a fresh process: one resampling; saves the labels to `out`, returns time and memory."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing, SpatialResample

    from wholebody.postprocessing import resample_nearest

    affine = input_affine(kind, (0.75, 0.75, 1.5))
    empty = MetaTensor(torch.zeros(1, 1, 1, 1).expand(1, *shape), affine=torch.as_tensor(affine))
    oriented = Orientation(axcodes="RAS", lazy=True)(empty)
    spaced = Spacing(pixdim=(1.5, 1.5, 1.5), mode="bilinear", lazy=True)(oriented)
    oriented_affine, oriented_shape = (
        oriented.peek_pending_affine(),
        tuple(int(s) for s in oriented.peek_pending_shape()),
    )
    label_affine, label_shape = spaced.peek_pending_affine(), tuple(int(s) for s in spaced.peek_pending_shape())
    rotation = np.linalg.solve(label_affine.numpy(), oriented_affine.numpy())[:3, :3]
    separable = not np.any(rotation - np.diag(np.diag(rotation)))
    labels = torch.randint(0, 105, label_shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    before = _rss_bytes()
    start = time.perf_counter()
    if impl == "ours":
        result = resample_nearest(labels, label_affine.numpy(), oriented_affine.numpy(), oriented_shape)
    else:
        image = MetaTensor(labels[None].to(torch.float32), affine=label_affine)
        resampled = SpatialResample(mode="nearest", padding_mode="border", dtype=torch.float64)(
            image, dst_affine=oriented_affine, spatial_size=oriented_shape
        )
        result = torch.as_tensor(resampled)[0].round().to(torch.uint8)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.save(out, result.numpy())
    return {
        "seconds": seconds,
        "extra_memory_gb": max(peak - before, 0) / 1e9,
        "label_shape": "x".join(map(str, label_shape)),
        "path": "separable" if separable else "sampled, chunked",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.inversion", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 400], help="input (output) grid, voxels")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "IMPL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    if args.child:
        kind, impl, out = args.child
        print(json.dumps(run_child(kind, impl, shape, Path(out))))  # noqa: T201 - to the parent
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="inversion-") as tmp:
        for kind in KINDS:
            results, labels = {}, {}
            for impl in ("ours", "monai"):
                out = Path(tmp) / f"{impl}.npy"
                command = [
                    sys.executable,
                    "-m",
                    "perf.inversion",
                    "--shape",
                    *map(str, shape),
                    "--child",
                    kind,
                    impl,
                    str(out),
                ]
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    log.error("%s / %s failed:\n%s", kind, impl, done.stderr[-2000:])
                    return 1
                results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
                labels[impl] = np.load(out)
                out.unlink()
            equal = float((labels["ours"] == labels["monai"]).mean())
            rows.append((kind, results["ours"], results["monai"], equal))
    machine = machine_info()
    print(f"machine: {machine.get('cpu')}, {machine.get('cores', '?')} cores; output {'x'.join(map(str, shape))}")
    columns = ["affine kind", "label map", "path", "ours s", "ours extra memory GB"]
    columns += ["MONAI SpatialResample s", "MONAI extra memory GB", "labels equal"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, ours, monai, equal in rows:
        print(
            f"| {kind} | {ours['label_shape']} | {ours['path']} | {ours['seconds']:.2f} | "
            f"{ours['extra_memory_gb']:.2f} | {monai['seconds']:.2f} | {monai['extra_memory_gb']:.2f} | {equal:.4%} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
