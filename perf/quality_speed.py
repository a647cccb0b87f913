"""Time and peak memory of the quality checks (clinical.quality.check_scan) before and after the whole-map passes.

    python -m perf.quality_speed                       # 512x512x397, three maps: ~4 min on 2 cores
    python -m perf.quality_speed --repeats 3           # medians of 3 runs each: ~12 min
    python -m perf.quality_speed --maps organs real --out perf/results/amd-epyc-2cores/quality_speed.md
    python -m perf.quality_speed --shape 128 128 100   # a quick look

Maps (uint8 [X, Y, Z], 0.84 x 0.84 x 1.5 mm, RAS), each with a synthetic CT (perf.quality_benchmark's, int16):
- `scattered`: like a random-weights result, every label over the whole volume: the argmax over 105
  classes (0..104) of Gaussian-smoothed noise (sigma 1) on a grid 4x coarser, nearest-upsampled.
- `organs`: ~100 box-shaped structures (perf.dicom_seg_benchmark.blocky_label_map, the map of
  perf.quality_benchmark).
- `real`: TotalSegmentator's masks of a real CT (wholebody.sample_data.real_label_map, 122x101x30 at 3 mm),
  nearest-upsampled to the shape: real organ shapes, ribs and vertebrae included.

Methods: `before` = one bounding-box crop per structure for every map (`check_scan(crop_volumes_max=inf)`,
the code before the whole-map passes, kept as the reference); `whole map` = the whole-map passes forced
(`crop_volumes_max=0`); `after` = check_scan's default, which picks one of the two by how often the boxes
cover the map (clinical.quality.CROP_VOLUMES_MAX). The statistics are computed once and given, as the router
and the client do. Each (map, method) runs in a fresh interpreter (`--measure`, internal) so its peak RSS
is its own: the kernel's high-water mark is reset just before check_scan (`/proc/self/clear_refs` 5) and
read after it (VmHWM); the table gives its growth above the RSS with the map, CT and statistics loaded.
With `--repeats N` the table gives the median seconds and the largest growth of N runs; the order of
the methods rotates each round (in a fixed order one method ran ~0.4 s slower on the `real` map in
every round, although the same code ran as fast as the other in one interpreter). The reports of all
runs on one map must be equal (sha256 of `to_dict()` as JSON): the last column.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from wholebody.atomic import atomic_path

log = logging.getLogger("perf.quality_speed")

MAPS = ("scattered", "organs", "real")
METHODS = {"before": math.inf, "whole map": 0.0, "after": None}  # crop_volumes_max; None: the default
SPACING = (0.84, 0.84, 1.5)
MIB = 2**20


def affine() -> np.ndarray:
    return np.diag([*SPACING, 1.0])


def scattered_map(shape: tuple[int, int, int], classes: int = 105, factor: int = 4, seed: int = 0) -> np.ndarray:
    """[X, Y, Z] uint8: argmax over `classes` of Gaussian-smoothed (sigma 1) noise on a grid `factor` times
    coarser, nearest-upsampled: every label scattered over the volume in patches of a few voxels, as a
    network with random weights labels a CT."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    coarse = tuple(-(-n // factor) for n in shape)
    best = np.full(coarse, -np.inf, np.float32)
    labels = np.zeros(coarse, np.uint8)
    for value in range(classes):
        field = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), 1.0)
        higher = field > best
        best[higher] = field[higher]
        labels[higher] = value
    full = labels.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
    return np.ascontiguousarray(full[: shape[0], : shape[1], : shape[2]])


def real_map(shape: tuple[int, int, int]) -> np.ndarray:
    """[X, Y, Z] uint8: wholebody.sample_data.real_label_map nearest-upsampled to `shape`."""
    from clinical.structures import label_names
    from wholebody.sample_data import real_label_map

    small = np.asanyarray(real_label_map(label_names()).dataobj)
    index = [np.arange(n) * small.shape[axis] // n for axis, n in enumerate(shape)]
    return np.ascontiguousarray(small[np.ix_(*index)])


def make_map(name: str, shape: tuple[int, int, int]) -> np.ndarray:
    from perf.dicom_seg_benchmark import blocky_label_map

    if name == "scattered":
        return scattered_map(shape)
    if name == "organs":
        return blocky_label_map(shape, 100)
    return real_map(shape)


def box_volumes(labels: np.ndarray) -> float:
    """The structures' bounding boxes (scipy.ndimage.find_objects), summed, in volumes of the map."""
    from scipy import ndimage

    boxes = [b for b in ndimage.find_objects(labels) if b is not None]
    return sum(math.prod(s.stop - s.start for s in b) for b in boxes) / labels.size


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}: run this on Linux")


def reset_peak_rss() -> int:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0: `5` into /proc/self/clear_refs);
    the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """This process's peak RSS (VmHWM) in bytes since the last reset_peak_rss."""
    return _status_kib("VmHWM") * 1024


def measure(folder: Path, method: str) -> dict[str, object]:
    """In this (fresh) interpreter: check_scan of the map in `folder` by `method`; seconds, CPU seconds,
    RSS (bytes) before and at the peak, the path taken and the report's sha256."""
    from clinical import quality
    from clinical.statistics import StructureStatistics
    from clinical.structures import label_names

    labels = np.load(folder / "labels.npy")
    ct = np.load(folder / "ct.npy")
    stats = [StructureStatistics(**row) for row in json.loads((folder / "statistics.json").read_text())]
    names = label_names()
    limit = METHODS[method]
    kwargs = {} if limit is None else {"crop_volumes_max": limit}
    floor = reset_peak_rss()
    wall, cpu = time.perf_counter(), time.process_time()
    report = quality.check_scan(labels, ct, affine(), names, statistics=stats, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = peak_rss()
    boxes = box_volumes(labels)
    crops = boxes <= (quality.CROP_VOLUMES_MAX if limit is None else limit)
    digest = hashlib.sha256(json.dumps(report.to_dict(), sort_keys=True).encode()).hexdigest()
    return {"seconds": wall, "cpu_seconds": cpu, "floor_rss": floor, "peak_rss": peak,
            "path": "crops" if crops else "whole map", "sha256": digest, "failed": len(report.failures())}


def prepare(name: str, shape: tuple[int, int, int], folder: Path) -> dict[str, object]:
    """Write the map, its CT and statistics under `folder`; what the table says of the map."""
    from clinical.statistics import structure_statistics
    from clinical.structures import label_names
    from perf.quality_benchmark import synthetic_ct

    started = time.perf_counter()
    labels = make_map(name, shape)
    ct = synthetic_ct(shape)
    stats = structure_statistics(labels, ct, affine(), label_names())
    folder.mkdir(parents=True)
    np.save(folder / "labels.npy", labels)
    np.save(folder / "ct.npy", ct)
    (folder / "statistics.json").write_text(json.dumps([asdict(row) for row in stats]))
    log.info("%s map made in %.1f s: %d structures, boxes %.2f volumes", name, time.perf_counter() - started,
             len(stats), box_volumes(labels))
    return {"structures": len(stats), "boxes": box_volumes(labels)}


def run_child(folder: Path, method: str) -> dict[str, object]:
    command = [sys.executable, "-m", "perf.quality_speed", "--measure", str(folder), method]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(shape: tuple[int, int, int], rows: list[tuple[str, dict, str, dict]], equal: dict[str, bool],
          loads: tuple[float, float], repeats: int) -> str:
    from perf.run import machine_info

    info = machine_info()
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores (load average {loads[0]:.1f} at the start, "
             f"{loads[1]:.1f} at the end: other jobs shared it); {shape[0]}x{shape[1]}x{shape[2]} label maps; "
             f"median of {repeats} run{'s' if repeats > 1 else ''} each (`python -m perf.quality_speed`).", "",
             "| map | structures | boxes (volumes) | method | path | seconds | CPU seconds | peak RSS growth MiB "
             "| failed checks | reports equal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, about, method, result in rows:
        growth = int(result["growth"]) / MIB
        lines.append(f"| {name} | {about['structures']} | {about['boxes']:.2f} | {method} | {result['path']} | "
                     f"{result['seconds']:.2f} | {result['cpu_seconds']:.2f} | {growth:.0f} | {result['failed']} | "
                     f"{'yes' if equal[name] else '**NO**'} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (kebab-case flags; the module docstring's examples as epilog)."""
    parser = argparse.ArgumentParser(prog="python -m perf.quality_speed", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 397), metavar=("X", "Y", "Z"),
                        help="label map shape (default: 512 512 397)")
    parser.add_argument("--maps", nargs="+", choices=MAPS, default=list(MAPS), help="which maps (default: all)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="which methods (default: all)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per map and method (default: 1)")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    parser.add_argument("--measure", nargs=2, metavar=("FOLDER", "METHOD"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shape = tuple(args.shape)
    start_load = os.getloadavg()[0]
    rows, equal = [], {}
    with tempfile.TemporaryDirectory(prefix="quality_speed-") as tmp:
        for name in args.maps:
            folder = Path(tmp) / name
            about = prepare(name, shape, folder)
            digests = set()
            runs: dict[str, list[dict]] = {method: [] for method in args.methods}
            for round_ in range(args.repeats):
                shift = round_ % len(args.methods)  # each method in each place of the order in turn
                for method in args.methods[shift:] + args.methods[:shift]:
                    result = run_child(folder, method)
                    log.info("%s, %s, run %d: %.2f s (%s)", name, method, round_ + 1, result["seconds"],
                             result["path"])
                    runs[method].append(result)
                    digests.add(result["sha256"])
            for method, results in runs.items():
                rows.append((name, about, method, {
                    **results[0], "seconds": statistics.median(r["seconds"] for r in results),
                    "cpu_seconds": statistics.median(r["cpu_seconds"] for r in results),
                    "growth": max(r["peak_rss"] - r["floor_rss"] for r in results)}))
            equal[name] = len(digests) == 1
            for path in folder.iterdir():
                path.unlink()  # ~0.3 GB per map
    text = table(shape, rows, equal, (start_load, os.getloadavg()[0]), args.repeats)
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp_path:
            tmp_path.write_text(text + "\n")
    return 0 if all(equal.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
