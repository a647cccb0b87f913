"""Convert a MONAI wholeBody_ct_segmentation bundle's checkpoints to ONNX and TensorRT plans for Triton.

For each resolution: export the network to ONNX (checked, and compared with PyTorch through onnxruntime),
then for each precision build a TensorRT engine, validate it against PyTorch fp32 on the same windows, and
only if it passes install it as the Triton model segresnet_<resolution>_trt_<precision> (model.plan,
validation.json, config.pbtxt) in the model repository.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from export.common import ExportError, md5sum
from export.onnx_export import OPSET, export_onnx, onnx_runner
from export.tensorrt_build import (
    VIAS,
    EngineSpec,
    build_engine,
    build_environment,
    engine_runner,
    tensorrt_unavailable,
    timing_cache_path,
    trtexec_command,
)
from export.triton_config import PLAN, VERSION, NotAModelRepository, check_model_repository, install_plan, plan_config
from export.validate import (
    TOLERANCES,
    Reference,
    Report,
    compare,
    compute_reference,
    format_table,
    validation_windows,
)
from wholebody.bundle import BundleError, checkpoint_path, load_network
from wholebody.contract import MODEL_REPOSITORY, RESOLUTIONS, network_model_name
from wholebody.sample_data import real_ct
from wholebody.triton_server.install import DEFAULT_CACHE

log = logging.getLogger("export")

PROG = "python -m export"
PRECISIONS = ("fp32", "fp16")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_TENSORRT = 0, 1, 2, 3

EPILOG = f"""\
examples:
  # everything: both checkpoints, fp32 and fp16 plans, into ./model_repository (needs a GPU and TensorRT)
  {PROG} --bundle ~/bundles/wholeBody_ct_segmentation

  # ONNX only (any machine), on a test bundle of random weights: export, check, compare with PyTorch
  python -m wholebody.bundle make-test --out .cache/test_bundle --init-filters 8
  {PROG} --bundle .cache/test_bundle --onnx-only --validation-windows 2

  # one fp16 plan of the 3 mm model, built from the ONNX file, into another repository
  {PROG} --bundle B --resolution lowres --precision fp16 --via onnx --out /srv/models

what gets written:
  <artifacts>/<resolution>/model.onnx                   the ONNX export (opset {OPSET})
  <artifacts>/timing_cache_<gpu>_sm<cc>_trt<ver>.bin    TensorRT timing cache, reused by later builds
  <out>/segresnet_<resolution>_trt_<precision>/config.pbtxt, 1/model.plan, 1/validation.json
A plan is installed only after it passed validation; every file is renamed into place whole.

--out must be an existing directory that is named model_repository or holds at least one
<model>/config.pbtxt. Validation thresholds against PyTorch fp32 (max error relative to the logit scale,
voxel label agreement, smallest per-class Dice on the CT windows; see export/validate.py for why):
  fp32 (ONNX, TensorRT with TF32 off): {TOLERANCES['fp32']}
  fp16:                                {TOLERANCES['fp16']}

exit status: 0 all done and valid; 1 an export, build or validation failed; 2 bad arguments or input;
3 no TensorRT here (ONNX was still exported and checked; use --onnx-only to make that the goal).
"""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bundle", type=Path, metavar="DIR", required=True,
                        help="MONAI bundle directory (configs/inference.json, models/model.pt, models/model_lowres.pt)")
    parser.add_argument("--resolution", nargs="+", choices=sorted(RESOLUTIONS), default=sorted(RESOLUTIONS),
                        help="checkpoints to convert (default: both)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS),
                        help="TensorRT plan precisions (default: both)")
    parser.add_argument("--max-batch", type=positive_int, metavar="N", default=8,
                        help="largest window batch of the plans' profile; Triton max_batch_size (default: 8)")
    parser.add_argument("--opt-batch", type=positive_int, metavar="N", default=4,
                        help="batch the plans are tuned for; the dynamic batcher's preferred size (default: 4)")
    parser.add_argument("--out", type=Path, metavar="REPO", default=MODEL_REPOSITORY,
                        help=f"Triton model repository to install into (default: {MODEL_REPOSITORY})")
    parser.add_argument("--artifacts", type=Path, metavar="DIR", default=DEFAULT_CACHE / "export",
                        help=f"folder for ONNX files and the timing cache (default: {DEFAULT_CACHE / 'export'})")
    parser.add_argument("--via", choices=VIAS, default="torch-tensorrt",
                        help="build engines with Torch-TensorRT's dynamo frontend or from the ONNX file with "
                             "TensorRT's parser (default: torch-tensorrt; falls back to onnx when the installed "
                             "Torch-TensorRT cannot name the output 'logits', i.e. before 2.14)")
    parser.add_argument("--onnx-only", action="store_true",
                        help="export and validate ONNX only, build no engines (exit 0 without TensorRT)")
    parser.add_argument("--workspace-gib", type=positive_float, metavar="GIB", default=8.0,
                        help="TensorRT builder workspace limit in GiB (default: 8)")
    parser.add_argument("--validation-windows", type=positive_int, metavar="N", default=4,
                        help="windows to validate on: half (rounded up) cut from a real CT, the rest random "
                             "(default: 4)")
    return parser


def export_resolution(args: argparse.Namespace, resolution: str, network: torch.nn.Module, reference: Reference,
                      repository: Path, build_engines: bool) -> list[Report]:
    """Export one checkpoint to ONNX and check it, then build, validate and install its plans.

    Args:
        args: The parsed command line.
        resolution: "highres" or "lowres".
        network: That checkpoint's network (eval, CPU).
        reference: PyTorch fp32 logits of the validation windows for this network.
        repository: The checked Triton model repository.
        build_engines: False for --onnx-only or without TensorRT.

    Returns:
        One report for the ONNX file, then one per precision (failed builds included).
    """
    batch = min(args.opt_batch, args.validation_windows)
    onnx_path = export_onnx(network, args.artifacts / resolution / "model.onnx")
    reports = [compare(f"{resolution} onnx", "fp32", onnx_runner(onnx_path), reference, batch)]
    if not build_engines or not reports[0].passed:
        return reports

    environment = build_environment()
    checkpoint = checkpoint_path(args.bundle, resolution)
    checkpoint_md5 = md5sum(checkpoint)
    for precision in args.precision:
        name = network_model_name(resolution, f"trt_{precision}")
        spec = EngineSpec(precision, args.opt_batch, args.max_batch, args.workspace_gib,
                          timing_cache_path(args.artifacts, environment))
        log.info("%s: the same engine from the ONNX file with trtexec: %s", name,
                 trtexec_command(onnx_path, repository / name / VERSION / PLAN, spec))
        try:
            engine, via = build_engine(args.via, network, onnx_path, spec)
            report = compare(name, precision, engine_runner(engine, spec), reference, batch)
        except ExportError as exc:
            log.error("%s: %s", name, exc)
            reports.append(Report(name, precision, TOLERANCES[precision], list(reference.windows.sources),
                                  failures=[str(exc)]))
            continue
        reports.append(report)
        if not report.passed:
            log.error("%s not installed: it failed validation", name)
            continue
        provenance = {
            **environment,
            "precision": precision,
            "built_via": via,
            "source_checkpoint": checkpoint.name,
            "source_checkpoint_md5": checkpoint_md5,
        }
        config = plan_config(name, args.max_batch, args.opt_batch, provenance)
        validation = {"model": name, **provenance, "onnx_opset": OPSET, "validation": report.as_dict()}
        install_plan(repository, config, engine, json.dumps(validation, indent=2) + "\n")
    return reports


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (see EPILOG)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.opt_batch > args.max_batch:
        parser.error(f"--opt-batch {args.opt_batch} exceeds --max-batch {args.max_batch}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # every input is checked before anything is written
    try:
        repository = check_model_repository(args.out)
        networks = {resolution: load_network(args.bundle, resolution) for resolution in args.resolution}
    except (BundleError, NotAModelRepository) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    unavailable = None if args.onnx_only else tensorrt_unavailable(args.via)
    if unavailable:
        log.warning("%s -- exporting ONNX only, then exiting with status %d", unavailable, EXIT_NO_TENSORRT)
    windows = validation_windows(args.validation_windows, real_ct("example_ct"))
    reports: list[Report] = []
    failed = False
    for resolution, network in networks.items():
        log.info("=== %s (%s)", resolution, checkpoint_path(args.bundle, resolution))
        reference = compute_reference(network, windows, min(args.opt_batch, args.validation_windows))
        try:
            reports += export_resolution(args, resolution, network, reference, repository,
                                         build_engines=not (args.onnx_only or unavailable))
        except ExportError as exc:
            log.error("%s: %s", resolution, exc)
            failed = True
            break
        finally:
            del reference

    if reports:
        print(format_table(reports))
    if failed or not all(report.passed for report in reports):
        return EXIT_FAILED
    if unavailable:
        log.error("no TensorRT plans were built: %s", unavailable)
        return EXIT_NO_TENSORRT
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
