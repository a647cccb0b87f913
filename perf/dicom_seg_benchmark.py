"""DICOM-SEG size, write and read time per encoding, against the NIfTI (.nii.gz) label map, one run.

A 512x512x397 label map (0.84 x 0.84 x 1.5 mm) with ~100 structures: a box per structure, of a
size and slice extent drawn from a seed, so each structure spans tens of slices as organs and bones
do (made the same way every time). Write: `clinical.dicom_seg.write_dicom_seg` (highdicom) against
nibabel's .nii.gz; read: `read_dicom_seg` (highdicom, back to the label map) against nibabel.
With `--readers`, also the time each other reader takes to open each SEG (tests/seg_readers.py runs
them as tests/test_clinical_seg_readers.py does: dcmqi's segimage2itkimage, pydicom-seg in its own
virtualenv, @cornerstonejs/adapters with node), whole process, its segments' voxel counts checked
against ours; "refuses" where the reader stops with an error. Prints markdown tables naming the machine.

    python -m perf.dicom_seg_benchmark                       # every encoding, ~3-5 min on 2 cores
    python -m perf.dicom_seg_benchmark --encodings labelmap-rle,binary --shape 256 256 200
    python -m perf.dicom_seg_benchmark --readers dcmqi,pydicom-seg,cornerstone   # needs make seg-readers
    python -m perf.dicom_seg_benchmark --real     # TotalSegmentator's real label map of example_ct_sm instead
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset

from clinical import structures as st
from clinical.dicom_seg import ENCODINGS, read_dicom_seg, write_dicom_seg
from clinical.dicom_series import ct_series_headers
from perf.run import machine_info

READERS = ("dcmqi", "pydicom-seg", "cornerstone")


def blocky_label_map(shape: tuple[int, int, int], structures: int = 100, seed: int = 0) -> np.ndarray:
    """[X, Y, Z] uint8: `structures` boxes (labels 1..structures) of 15-25 % of the in-plane size and 5-30 %
    of the slices each, at seeded places inside a body ellipse; later boxes overwrite earlier ones."""
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    labels = np.zeros(shape, dtype=np.uint8)
    for label in range(1, structures + 1):
        sx, sy = (rng.uniform(0.15, 0.25, 2) * (nx, ny)).astype(int)
        sz = int(rng.uniform(0.05, 0.3) * nz)
        x0 = rng.integers(int(0.1 * nx), int(0.9 * nx) - sx)
        y0 = rng.integers(int(0.2 * ny), int(0.8 * ny) - sy)
        z0 = rng.integers(0, nz - sz)
        labels[x0:x0 + sx, y0:y0 + sy, z0:z0 + sz] = label
    return labels


def _name_counts(values: np.ndarray | dict[int, int], names: dict[int, str]) -> dict[str, int]:
    """{structure name: voxels} from a volume of segment values, or from {value: voxels}, and {value: name}."""
    counts = values if isinstance(values, dict) else dict(enumerate(np.bincount(values.reshape(-1))))
    return {names[v]: int(n) for v, n in counts.items() if n and v in names and names[v] != "Background"}


def time_reader(reader: str, seg: Path, ct_files: Sequence[Path], expected: dict[str, int]) -> str:
    """Seconds `reader` takes to open `seg` (its whole process), "refuses" if it stops with an error.
    Raises RuntimeError when it opens the file but its segments' voxel counts differ from `expected`."""
    from tests import seg_readers  # the readers as the tests install and run them (make seg-readers)

    with tempfile.TemporaryDirectory() as tmp:
        folder, cwd = Path(tmp), None
        if reader == "dcmqi":
            command = seg_readers.dcmqi_command(seg, folder)
        elif reader == "pydicom-seg":
            command = seg_readers.pydicom_seg_command(seg, folder / "read.npz")
        else:
            command, cwd = seg_readers.node_command("cornerstone-counts", seg, folder / "read.json", ct_files)
        t0 = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        if reader == "dcmqi":
            volumes = sorted(folder.glob("*.nii.gz"))
            if done.returncode != 0 or not volumes:
                return "refuses"
            meta = json.loads((folder / "meta.json").read_text())
            names = {int(s["labelID"]): s["SegmentLabel"] for s in meta["segmentAttributes"][0]}
            got = _name_counts(np.asanyarray(nib.load(volumes[0]).dataobj).astype(np.int64), names)
        elif reader == "pydicom-seg":
            if done.returncode != 0:
                return "refuses"
            read = np.load(folder / "read.npz")
            names = {int(k): v for k, v in json.loads(str(read["segments"])).items()}
            got = _name_counts(read["labels"].astype(np.int64), names)
        else:
            read = json.loads((folder / "read.json").read_text())
            if done.returncode != 0:
                return "refuses"
            names = {int(k): v for k, v in read["segments"].items()}
            got = _name_counts({int(k): v for k, v in read["counts"].items()}, names)
    if got != expected:
        raise RuntimeError(f"{reader} read {seg.name} with other voxel counts than written")
    return f"{seconds:.2f}"


def _seconds(cell: str) -> float:
    return float("inf") if cell == "refuses" else float(cell)


def _save_headers(headers: list[Dataset], folder: Path) -> list[Path]:
    """The CT headers as files (no pixel data): the stack cornerstone takes its slices' metadata from."""
    folder.mkdir()
    paths = []
    for i, ds in enumerate(headers):
        paths.append(folder / f"slice_{i:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.dicom_seg_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--encodings", default=",".join(ENCODINGS),
                        help="comma-separated, of: %(default)s")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 397), metavar=("X", "Y", "Z"))
    parser.add_argument("--structures", type=int, default=100, help="number of structures (default %(default)s)")
    parser.add_argument("--readers", default="", help=f"comma-separated, of: {','.join(READERS)} (default: none)")
    parser.add_argument("--real", action="store_true",
                        help="the real label map of wholebody.sample_data.real_label_map (122x101x30, real organ "
                        "shapes) instead of the boxes; --shape and --structures are then ignored")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each measurement, the fastest reported (default %(default)s)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    encodings = [e for e in args.encodings.split(",") if e]
    unknown = [e for e in encodings if e not in ENCODINGS]
    if unknown:
        parser.error(f"unknown encoding(s) {unknown}; choose from {', '.join(ENCODINGS)}")
    readers = [r for r in args.readers.split(",") if r]
    if any(r not in READERS for r in readers):
        parser.error(f"unknown reader(s) in {args.readers!r}; choose from {', '.join(READERS)}")
    if args.real:
        from wholebody.sample_data import real_label_map

        image = real_label_map(st.label_names())
        label_map, affine = np.asanyarray(image.dataobj), image.affine
        shape = label_map.shape
    else:
        shape = tuple(args.shape)
        affine = np.diag([0.84, 0.84, 1.5, 1.0])
        label_map = blocky_label_map(shape, args.structures)
    present = len(np.unique(label_map)) - 1
    headers = ct_series_headers(shape, affine)
    info = machine_info()
    load_start = os.getloadavg()[0]
    rows = []
    reader_rows: list[list[str]] = []
    names = {label: st.structures()[label].name for label in range(1, len(st.structures()))}
    expected = _name_counts(label_map.astype(np.int64), names)
    with tempfile.TemporaryDirectory() as tmp:
        ct_files = _save_headers(headers, Path(tmp) / "ct") if "cornerstone" in readers else []
        nifti = Path(tmp) / "labels.nii.gz"
        write_s = read_s = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            nib.save(nib.Nifti1Image(label_map, affine), nifti)
            t1 = time.perf_counter()
            back = np.asanyarray(nib.load(nifti).dataobj)
            t2 = time.perf_counter()
            assert np.array_equal(back, label_map)
            write_s, read_s = min(write_s, t1 - t0), min(read_s, t2 - t1)
        rows.append(("NIfTI .nii.gz (nibabel)", nifti.stat().st_size, write_s, read_s, "-"))
        for encoding in encodings:
            path = Path(tmp) / f"{encoding}.dcm"
            write_s = read_s = float("inf")
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                write_dicom_seg(label_map, headers, path, encoding=encoding)
                t1 = time.perf_counter()
                back, segments = read_dicom_seg(path, headers)
                t2 = time.perf_counter()
                if not np.array_equal(back, label_map) or len(segments) != present:
                    raise RuntimeError(f"{encoding}: the SEG read back differs from the label map")
                write_s, read_s = min(write_s, t1 - t0), min(read_s, t2 - t1)
            del back
            seg_type, syntax = ENCODINGS[encoding]
            rows.append((f"DICOM-SEG {encoding} ({seg_type}, {syntax.name})", path.stat().st_size, write_s, read_s,
                         "yes"))
            print(f"  {encoding}: {path.stat().st_size / 1e6:.1f} MB, write {write_s:.1f} s, read {read_s:.1f} s",
                  file=sys.stderr, flush=True)
            if readers:
                cells = [min((time_reader(r, path, ct_files, expected) for _ in range(args.repeats)), key=_seconds)
                         for r in readers]
                reader_rows.append([encoding, *cells])
                print(f"  {encoding}: {dict(zip(readers, cells))}", file=sys.stderr, flush=True)
            path.unlink()
    runs = "one run each" if args.repeats == 1 else f"fastest of {args.repeats} runs each"
    print(f"Machine: {info['cpu']}, {info['cores']} cores, load average {load_start:.1f} at the start and "
          f"{os.getloadavg()[0]:.1f} at the end. Label map {'x'.join(map(str, shape))} uint8 "
          f"({label_map.nbytes / 1e6:.1f} MB), {present} structures "
          f"({'real: TotalSegmentator on example_ct_sm' if args.real else 'boxes'}); {runs}.\n")
    print("| output | size MB | write s | read s | read back equal |")
    print("|---|---|---|---|---|")
    for name, size, write_s, read_s, equal in rows:
        print(f"| {name} | {size / 1e6:.2f} | {write_s:.2f} | {read_s:.2f} | {equal} |")
    if readers:
        print("\nOpening each SEG, whole process in seconds (voxel counts per segment checked against ours):\n")
        print(f"| encoding | {' | '.join(readers)} |")
        print(f"|---|{'---|' * len(readers)}")
        for row in reader_rows:
            print(f"| {' | '.join(row)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
