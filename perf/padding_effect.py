"""What pixel padding does to a segmentation: a real CT series padded as scanners pad it, segmented with
its padding as it is (the client's default, what dcm2niix then the bundle gives) and with --padding-to-air.

The real Siemens series (`wholebody.sample_data.real_ct_dicom`: 512x512x20, 0.98 mm, 500 mm field of
view) is rewritten with every pixel outside its reconstruction circle (the circle inscribed in the
field of view) at -3024 HU: stored -2000 with RescaleIntercept -1024 and PixelPaddingValue -2000, as
GE and Siemens scanners write it. Printed:

- the padded share of the volume (what the client reports per scan);
- the network's input: the bundle's preprocessing (`wholebody.preprocessing.preprocess`: resampling,
  NormalizeIntensity(nonzero) and ScaleIntensity(-1, 1), statistics of the whole volume) of the
  padded series as it is and with its padding at -1024 HU, at the voxels of the body (above -500 HU):
  the median of soft tissue (20..60 HU) in each, and the mean absolute difference;
- the labels' agreement (% of voxels with the same label, and % of the voxels labelled in either) between
  padding as it is, padding to air and the unpadded original, each through the CLI on one server.

    python -m perf.padding_effect                     # starts a test server (random weights), ~3 min on 2 cores
    python -m perf.padding_effect -u localhost:8001   # a running server, e.g. with the released bundle
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom

from clinical.dicom_series import read_ct_series, write_ct_series
from perf.run import machine_info
from wholebody.sample_data import real_ct_dicom

PADDING_STORED = -2000  # with intercept -1024: -3024 HU
AIR_HU = -1024


def write_padded_series(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write the real series with its field-of-view corners padded into `folder` (CT Image Storage, a
    SeriesInstanceUID of its own, PixelPaddingValue set). Returns the original volume [X, Y, Z] (int16 HU),
    its RAS affine [4, 4] and the padded pixels [X, Y] (bool: outside the reconstruction circle)."""
    original, = read_ct_series(real_ct_dicom())
    hu = original.volume
    nx, ny = hu.shape[:2]
    x, y = np.meshgrid(np.arange(nx) - (nx - 1) / 2, np.arange(ny) - (ny - 1) / 2, indexing="ij")
    outside = x**2 + y**2 > (min(nx, ny) / 2) ** 2
    padded = np.where(outside[:, :, None], np.int16(PADDING_STORED - 1024), hu)
    for f in write_ct_series(padded, original.affine, folder, series_description="real CT, padded"):
        ds = pydicom.dcmread(f)
        ds.add_new(0x00280120, "SS", PADDING_STORED)  # PixelPaddingValue; its VR is the pixels' (signed)
        ds.save_as(f)
    return hu, original.affine, outside


def network_input_shift(padded: np.ndarray, aired: np.ndarray, affine: np.ndarray,
                        pixdim: tuple[float, float, float]) -> dict[str, float]:
    """Median of soft tissue (20..60 HU) in the preprocessed padded and aired volumes, and the mean absolute
    difference at the body's voxels (above -500 HU after resampling). Arrays: [X, Y, Z] HU."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    from wholebody.preprocessing import preprocess

    def resampled_hu(volume: np.ndarray) -> np.ndarray:
        data = MetaTensor(torch.from_numpy(volume.astype(np.float32))[None], affine=torch.as_tensor(affine))
        data = Spacing(pixdim=pixdim, mode="bilinear", dtype=torch.float64)(Orientation(axcodes="RAS")(data))
        return data.as_tensor()[0].numpy()

    hu = resampled_hu(aired)
    body, tissue = hu > -500, (hu >= 20) & (hu <= 60)
    a = preprocess(torch.from_numpy(padded.astype(np.float32)), affine, pixdim).image.numpy()
    b = preprocess(torch.from_numpy(aired.astype(np.float32)), affine, pixdim).image.numpy()
    return {"tissue_padded": float(np.median(a[tissue])), "tissue_air": float(np.median(b[tissue])),
            "body_mean_abs_difference": float(np.abs(a[body] - b[body]).mean())}


def agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """% of voxels with the same label; % of the voxels labelled (non-zero) in either with the same label."""
    same = a == b
    labelled = (a > 0) | (b > 0)
    return 100.0 * same.mean(), 100.0 * same[labelled].mean() if labelled.any() else 100.0


@contextlib.contextmanager
def _server(url: str | None, work: Path) -> Iterator[str]:
    if url is not None:
        yield url
        return
    from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
    from wholebody.triton_server import LocalTritonServer

    repo = copy_model_repository(work / "model_repository")
    install_bundle(make_test_bundle(work / "bundle", init_filters=8, seed=0), repo)
    with LocalTritonServer(model_repository=repo) as server:
        yield server.grpc_url


def _labels(url: str, source: Path, out: Path, resolution: str, *extra: str) -> np.ndarray:
    from client.__main__ import main as client_main

    with contextlib.redirect_stdout(io.StringIO()):  # the CLI's closing line: the table is what this prints
        status = client_main([str(source), "-o", str(out), "-u", url, "--resolution", resolution, "-q", *extra])
    if status != 0:
        raise SystemExit(f"python -m client {source} failed (exit {status})")
    path, = out.rglob("*_seg.nii.gz")
    return np.asarray(nib.load(path).dataobj)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.padding_effect", description=__doc__.split("\n\n")[0])
    parser.add_argument("-u", "--url", help="a running server (default: start a test server, random weights)")
    parser.add_argument("--resolution", default="lowres", choices=["lowres", "highres"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    pixdim = (3.0, 3.0, 3.0) if args.resolution == "lowres" else (1.5, 1.5, 1.5)
    with tempfile.TemporaryDirectory(prefix="padding-effect-") as tmp:
        work = Path(tmp)
        hu, affine, outside = write_padded_series(work / "padded")
        share = 100.0 * outside.mean()
        padded = np.where(outside[:, :, None], np.int16(PADDING_STORED - 1024), hu)
        aired = np.where(outside[:, :, None], np.int16(AIR_HU), hu)
        shift = network_input_shift(padded, aired, affine, pixdim)
        with _server(args.url, work) as url:
            as_is = _labels(url, work / "padded", work / "as_is", args.resolution)
            to_air = _labels(url, work / "padded", work / "to_air", args.resolution, "--padding-to-air")
            unpadded = _labels(url, real_ct_dicom(), work / "original", args.resolution)
    info = machine_info()
    server = args.url or "a test server (test bundle: random weights, init_filters=8)"
    print(f"machine: {info['cpu']}, {info['cores']} cores; {server}, {args.resolution}\n")
    print(f"Real Siemens series 512x512x20, field-of-view corners padded at -3024 HU: {share:.1f} % of the voxels\n")
    print("| network input (after the bundle's preprocessing) | padding as is | padding to air |")
    print("|---|---|---|")
    print(f"| soft tissue 20..60 HU, median | {shift['tissue_padded']:+.3f} | {shift['tissue_air']:+.3f} |")
    print(f"| body voxels, mean abs difference | {shift['body_mean_abs_difference']:.3f} | |\n")
    print("| labels compared | same label, all voxels % | same label, voxels labelled in either % |")
    print("|---|---|---|")
    for name, a, b in (("as is vs to air", as_is, to_air), ("as is vs unpadded original", as_is, unpadded),
                       ("to air vs unpadded original", to_air, unpadded)):
        every, labelled = agreement(a, b)
        print(f"| {name} | {every:.2f} | {labelled:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
