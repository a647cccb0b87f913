"""Segment a real CT through a local Triton server on the CPU: the README's first command.

    python -m wholebody.demo                          # random-weight bundle, example CT, lowres
    python -m wholebody.demo --bundle ~/wholeBody_ct_segmentation --ct my_ct.nii.gz

Installs the bundle's checkpoints into model_repository/ (a random-weight bundle of the real
architecture when --bundle is not given: the released weights cannot be downloaded everywhere,
and the labels of random weights mean nothing), starts tritonserver with the CPU configs, runs
the client on the CT and stops the server.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from client.__main__ import main as client_main
from wholebody.bundle import BundleError, install_bundle, make_test_bundle
from wholebody.contract import MODEL_REPOSITORY, RESOLUTIONS
from wholebody.sample_data import real_ct
from wholebody.served_models import models_to_load
from wholebody.triton_server import DEFAULT_CACHE, LocalTritonServer, models_with_config

log = logging.getLogger("wholebody.demo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m wholebody.demo",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bundle", type=Path, help="MONAI wholeBody_ct_segmentation bundle directory")
    parser.add_argument("--ct", type=Path, help="NIfTI CT to segment (default: a real abdomen CT, 3 mm)")
    parser.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="lowres")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("output"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    bundle = args.bundle
    if bundle is None:
        bundle = DEFAULT_CACHE / "bundle_random_weights"
        if not (bundle / "models" / "model_lowres.pt").exists():
            log.info("no --bundle given: making one with random weights of the real architecture in %s", bundle)
            make_test_bundle(bundle, init_filters=32, seed=0)
    try:
        install_bundle(bundle, MODEL_REPOSITORY)
    except BundleError as exc:
        log.error("error: %s", exc)
        return 2
    ct = args.ct or real_ct("example_ct")
    # the CPU configs run the network inside the sliding-window stage: no network model to load
    models = models_to_load(MODEL_REPOSITORY, "cpu", models_with_config(MODEL_REPOSITORY, "cpu"))
    with LocalTritonServer(config_name="cpu", models=models) as server:
        log.info("tritonserver ready at %s (CPU); segmenting %s", server.grpc_url, ct)
        return client_main(
            [str(ct), "-o", str(args.output_dir), "-u", server.grpc_url, "--resolution", args.resolution,
             "--summary", "--overwrite"]
        )


if __name__ == "__main__":
    sys.exit(main())
