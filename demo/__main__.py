"""Segment a real CT through a local Triton server on the CPU: the README's first command.

    python -m demo                           # the released bundle (downloaded once), example CT, lowres
    python -m demo --random-weights          # random weights of the real architecture, no download
    python -m demo --bundle ~/wholeBody_ct_segmentation --ct my_ct.nii.gz

Weights: --bundle DIR, else the released wholeBody_ct_segmentation bundle fetched with MONAI's bundle
download into the cache and verified (md5, checkpoints load); where that cannot be had, one line says
why and random weights of the real architecture are used (their labels mean nothing). The bundle's
checkpoints are installed into model_repository/, tritonserver starts with the CPU configs, the client
segments the CT, the server stops, and the last line says which weights made the labels.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from client.__main__ import main as client_main
from wholebody.bundle import BundleError, install_bundle
from wholebody.bundle_download import DEFAULT_TIMEOUT_S, BundleDownloadError, Weights, choose_weights
from wholebody.contract import MODEL_REPOSITORY, RESOLUTIONS
from wholebody.sample_data import real_ct
from wholebody.served_models import models_to_load, models_with_config
from wholebody.triton_server import LocalTritonServer
from wholebody.triton_server.install import DEFAULT_CACHE

log = logging.getLogger("demo")


def build_parser() -> argparse.ArgumentParser:
    """The demo's flags; tests/test_docs.py parses the docs' commands with it."""
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument("--bundle", type=Path, help="MONAI wholeBody_ct_segmentation bundle directory")
    weights.add_argument("--random-weights", action="store_true",
                         help="random weights of the real architecture, no download (labels mean nothing)")
    parser.add_argument("--bundle-url", action="append",
                        help="archive URL of the released bundle to try instead of MONAI's (repeatable)")
    parser.add_argument("--download-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds each network operation of the download may take")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the bundles are kept")
    parser.add_argument("--ct", type=Path, help="NIfTI CT to segment (default: a real abdomen CT, 3 mm)")
    parser.add_argument("--resolution", choices=sorted(RESOLUTIONS), default="lowres")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("output"))
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The demo's flags, parsed."""
    return build_parser().parse_args(argv)


def demo_weights(args: argparse.Namespace) -> Weights:
    """The weights the flags ask for: --bundle, --random-weights, or the released bundle with a fallback."""
    return choose_weights(args.cache, args.bundle, download=not args.random_weights, random_fallback=True,
                          urls=args.bundle_url, timeout=args.download_timeout)


def main(argv: list[str] | None = None) -> int:
    """Install the chosen weights, serve them on the CPU, segment the CT; the client's exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        weights = demo_weights(args)
        log.info("weights: %s", weights.description)
        install_bundle(weights.bundle, MODEL_REPOSITORY)
    except (BundleError, BundleDownloadError) as exc:
        log.error("error: %s", exc)
        return 2
    ct = args.ct or real_ct("example_ct")
    # the CPU configs run the network inside the sliding-window stage: no network model to load
    models = models_to_load(MODEL_REPOSITORY, "cpu", models_with_config(MODEL_REPOSITORY, "cpu"))
    with LocalTritonServer(config_name="cpu", models=models) as server:
        log.info("tritonserver ready at %s (CPU); segmenting %s", server.grpc_url, ct)
        status = client_main(
            [str(ct), "-o", str(args.output_dir), "-u", server.grpc_url, "--resolution", args.resolution,
             "--summary", "--overwrite"]
        )
    log.info("the labels above were made with %s", weights.description)
    return status


if __name__ == "__main__":
    sys.exit(main())
