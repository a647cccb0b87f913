"""python -m perf.evaluation_picture: make docs/images/evaluation.png with `python -m evaluation evaluate --compare`.

No weights of the bundle can be downloaded on the project's machines, so the picture measures agreement,
not accuracy: a local server (CPU configs) serves the small test network (`init_filters=8`, random
weights); the dataset is crops of the two real CTs of the test data (TotalSegmentator's sdist, see
`wholebody.sample_data.real_ct`); the ground truth is the `torch_fp32` network's label map (made with
`python -m client`), and `--compare network=torch_fp32 network=torch_amp` scores both variants against
it: fp32 again (deterministic: Dice 1) and amp (bf16 autocast on the CPU). Prints the CLI's summary.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from client.__main__ import main as client_main
from evaluation.__main__ import main as evaluation_main
from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.contract import REPO_ROOT
from wholebody.sample_data import real_ct
from wholebody.triton_server import LocalTritonServer

# (CT, voxel box) crops of the real CTs: abdomen 122x101x112 at 3 mm, chest 233x167x191 at 1.5 mm
CROPS = {
    "abdomen_a": ("example_ct", (slice(10, 74), slice(10, 74), slice(0, 56))),
    "abdomen_b": ("example_ct", (slice(50, 114), slice(30, 94), slice(50, 106))),
    "abdomen_c": ("example_ct", (slice(30, 94), slice(20, 84), slice(30, 86))),
    "chest_a": ("aorta_ct", (slice(40, 168), slice(20, 148), slice(0, 96))),
    "chest_b": ("aorta_ct", (slice(60, 188), slice(30, 158), slice(90, 186))),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.evaluation_picture", description=__doc__.split("\n")[0])
    parser.add_argument("--picture", type=Path, default=REPO_ROOT / "docs" / "images" / "evaluation.png")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with tempfile.TemporaryDirectory(prefix="evaluation-picture-") as tmp:
        work = Path(tmp)
        repo = copy_model_repository(work / "model_repository")
        install_bundle(make_test_bundle(work / "bundle", init_filters=8, seed=0), repo)
        images = work / "dataset" / "imagesTr"
        images.mkdir(parents=True)
        for case, (ct, box) in CROPS.items():
            crop = nib.load(real_ct(ct)).slicer[box]
            nib.save(nib.Nifti1Image(np.asarray(crop.dataobj), crop.affine, crop.header), images / f"{case}.nii.gz")
        with LocalTritonServer(model_repository=repo) as server:
            url = server.grpc_url
            truth = work / "fp32"
            if client_main([str(images), "-o", str(truth), "-u", url, "--resolution", "lowres", "--network",
                            "torch_fp32", "-q"]) != 0:
                raise RuntimeError("the ground-truth run failed")
            labels = work / "dataset" / "labelsTr"
            labels.mkdir()
            for case in CROPS:
                shutil.copy(truth / f"{case}_seg.nii.gz", labels / f"{case}.nii.gz")
            out = work / "eval"
            code = evaluation_main(["evaluate", str(work / "dataset"), "-o", str(out), "-u", url, "--resolution",
                                    "lowres", "-q", "--compare", "network=torch_fp32", "network=torch_amp"])
        if code != 0:
            raise RuntimeError(f"evaluate exited {code}")
        args.picture.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "dice.png", args.picture)
        print(f"picture: {args.picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
