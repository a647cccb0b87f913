"""Time and size of the clinical outputs for a realistic label map, beside the NIfTI label output.

    python -m perf.clinical                      # 512x512x397 synthetic CT, 104 structures
    python -m perf.clinical --shape 256 256 200

The label map is made from a seed: 104 structures as blocks of a 4 x 26 lattice inside the body
(every structure present, sizes like organs'), over the synthetic CT of `wholebody.sample_data`.
Each output is written once into a temporary folder (timed, size on disk), then read back where a
reader exists. Single runs on a shared machine: indicative only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from clinical.preview import write_preview
from clinical.seg_nrrd import read_seg_nrrd, write_seg_nrrd
from clinical.statistics import structure_statistics, write_statistics
from perf.run import machine_info
from wholebody.sample_data import synthetic_ct

STRUCTURES = 104


def lattice_labels(shape: tuple[int, int, int]) -> np.ndarray:
    """104 block-shaped structures filling the central part of the volume."""
    labels = np.zeros(shape, np.uint8)
    nx, ny, nz = shape
    xs = np.linspace(nx * 0.2, nx * 0.8, 5).astype(int)
    zs = np.linspace(nz * 0.05, nz * 0.95, 27).astype(int)
    y0, y1 = int(ny * 0.3), int(ny * 0.7)
    label = 1
    for a in range(4):
        for b in range(26):
            labels[xs[a] : xs[a + 1], y0:y1, zs[b] : zs[b + 1]] = label
            label += 1
    return labels


def _timed(action):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    result = action()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.clinical", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 397], help="CT grid, voxels")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)
    image = synthetic_ct(shape)
    ct = np.asarray(image.dataobj)
    labels = lattice_labels(shape)
    names = ["background"] + [f"structure_{i}" for i in range(1, STRUCTURES + 1)]
    colors = [(0, 0, 0)] + [((37 * i) % 256, (91 * i) % 256, (53 * i) % 256) for i in range(1, STRUCTURES + 1)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="clinical-perf-") as tmp:
        folder = Path(tmp)
        nifti = folder / "labels.nii.gz"
        _, seconds = _timed(lambda: nib.save(nib.Nifti1Image(labels, image.affine), nifti))
        _, read = _timed(lambda: np.asarray(nib.load(nifti).dataobj))
        rows.append(("NIfTI labels (.nii.gz, nibabel)", seconds, nifti.stat().st_size, read))
        seg = folder / "labels.seg.nrrd"
        _, seconds = _timed(lambda: write_seg_nrrd(seg, labels, image.affine, names, colors))
        back, read = _timed(lambda: read_seg_nrrd(seg))
        assert np.array_equal(back.label_map, labels) and len(back.segments) == STRUCTURES
        rows.append((".seg.nrrd (gzip level 1)", seconds, seg.stat().st_size, read))
        stats, seconds = _timed(lambda: structure_statistics(labels, ct, image.affine, names))
        _, write = _timed(lambda: write_statistics(stats, folder / "s.json", folder / "s.csv"))
        size = (folder / "s.json").stat().st_size + (folder / "s.csv").stat().st_size
        rows.append((f"statistics ({len(stats)} structures; JSON + CSV)", seconds + write, size, None))
        png = folder / "preview.png"
        _, seconds = _timed(lambda: write_preview(png, ct, image.affine, labels, colors))
        rows.append(("preview PNG", seconds, png.stat().st_size, None))
    machine = machine_info()
    grid = "x".join(map(str, shape))
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; label map {grid}, {STRUCTURES} structures")  # noqa: T201
    print("| output | write s | size MB | read s |")  # noqa: T201
    print("|---|---|---|---|")  # noqa: T201
    for name, seconds, size, read in rows:
        print(f"| {name} | {seconds:.2f} | {size / 1e6:.2f} | {'' if read is None else f'{read:.2f}'} |")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
