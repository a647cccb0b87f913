"""Reading a MONAI wholeBody_ct_segmentation bundle directory, and making a test one.

A bundle directory is laid out as MONAI's `python -m monai.bundle download` leaves it:

    configs/inference.json      # its `network_def` builds the network
    models/model.pt             # 1.5 mm "highres" checkpoint (a state dict)
    models/model_lowres.pt      # 3.0 mm "lowres" checkpoint

The real bundle works unchanged; `make_test_bundle` writes one of the same layout with seeded random
weights, because the real weights cannot be downloaded on machines without internet access.

    python -m wholebody.bundle make-test --out .cache/test_bundle --init-filters 8
    python -m wholebody.bundle install --bundle .cache/test_bundle   # into model_repository/
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from wholebody.atomic import atomic_path
from wholebody.contract import (
    IN_CHANNELS,
    MODEL_REPOSITORY,
    NUM_CLASSES,
    RESOLUTIONS,
    TORCH_VARIANTS,
    network_model_name,
)

log = logging.getLogger(__name__)

INFERENCE_CONFIG = Path("configs") / "inference.json"

# The bundle's network_def (configs/inference.json of wholeBody_ct_segmentation 0.2.5).
NETWORK_DEF: dict[str, Any] = {
    "_target_": "SegResNet",
    "spatial_dims": 3,
    "in_channels": IN_CHANNELS,
    "out_channels": NUM_CLASSES,
    "init_filters": 32,
    "blocks_down": [1, 2, 2, 4],
    "blocks_up": [1, 1, 1],
    "dropout_prob": 0.2,
}


class BundleError(ValueError):
    """The bundle directory or a checkpoint in it is not usable; the message says why."""


def read_network_def(bundle_dir: Path) -> dict[str, Any]:
    """The `network_def` of the bundle's inference config, as plain JSON data."""
    config_path = Path(bundle_dir) / INFERENCE_CONFIG
    if not config_path.is_file():
        raise BundleError(f"{config_path} not found: is {bundle_dir} a MONAI bundle directory?")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{config_path} is not valid JSON: {exc}") from exc
    if "network_def" not in config:
        raise BundleError(f"{config_path} has no 'network_def'")
    return dict(config["network_def"])


def build_network(network_def: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate a `network_def` the way MONAI's bundle runner does (ConfigParser)."""
    parser = ConfigParser({"network_def": dict(network_def)})
    network = parser.get_parsed_content("network_def")
    if not isinstance(network, torch.nn.Module):
        raise BundleError(f"network_def built a {type(network).__name__}, not a torch.nn.Module")
    return network


def checkpoint_path(bundle_dir: Path, resolution: str) -> Path:
    if resolution not in RESOLUTIONS:
        raise BundleError(f"unknown resolution {resolution!r}; choose one of {sorted(RESOLUTIONS)}")
    path = Path(bundle_dir) / "models" / RESOLUTIONS[resolution].checkpoint
    if not path.is_file():
        raise BundleError(f"{path} not found: the {resolution} checkpoint of the bundle is missing")
    return path


def _state_dict_of(checkpoint: Any, path: Path) -> dict[str, torch.Tensor]:
    """Accept a plain state dict, `{"model": state_dict}` (CheckpointSaver) and `module.` prefixes."""
    if isinstance(checkpoint, Mapping) and "model" in checkpoint and isinstance(checkpoint["model"], Mapping):
        checkpoint = checkpoint["model"]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise BundleError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def load_checkpoint(network: torch.nn.Module, path: Path) -> torch.nn.Module:
    """Load a checkpoint into `network`, failing with the keys that do not fit."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = _state_dict_of(checkpoint, path)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    )
    if missing or unexpected or mismatched:
        parts = []
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", mismatched)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" … ({len(keys)} in all)" if len(keys) > 5 else "")
                parts.append(f"{what}: {shown}")
        raise BundleError(f"{path} does not fit the bundle's network_def; " + "; ".join(parts))
    network.load_state_dict(state_dict)
    return network.eval()


def load_network(bundle_dir: Path, resolution: str) -> torch.nn.Module:
    """The bundle's network with the `resolution` checkpoint loaded, in eval mode, on the CPU."""
    network = build_network(read_network_def(bundle_dir))
    return load_checkpoint(network, checkpoint_path(bundle_dir, resolution))


def make_test_bundle(out: Path, init_filters: int = 32, seed: int = 0) -> Path:
    """Write a bundle directory of the real layout with seeded random weights for both resolutions.

    `init_filters` below the real 32 makes a smaller, faster network of the same structure.
    """
    out = Path(out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(parents=True, exist_ok=True)
    network_def = dict(NETWORK_DEF, init_filters=init_filters)
    inference = {
        "displayable_configs": {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1},
        "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
        "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
        "network_def": network_def,
        "_comment": f"test bundle: random weights (seed {seed}), not the released model",
    }
    (out / INFERENCE_CONFIG).write_text(json.dumps(inference, indent=2) + "\n")
    for index, resolution in enumerate(sorted(RESOLUTIONS)):
        torch.manual_seed(seed + index)
        network = build_network(network_def)
        target = out / "models" / RESOLUTIONS[resolution].checkpoint
        with atomic_path(target) as partial:
            torch.save(network.state_dict(), partial)
    return out


def copy_model_repository(target: Path, source: Path = MODEL_REPOSITORY) -> Path:
    """Copy a model repository's configs and code, without installed weights or engines."""
    shutil.copytree(
        source,
        target,
        ignore=shutil.ignore_patterns("*.pt", "*.plan", "*.onnx", "*.partial", "network_def.json", "__pycache__"),
    )
    return target


def install_bundle(bundle_dir: Path, model_repository: Path) -> list[Path]:
    """Put the bundle's network_def and checkpoints into every PyTorch network model of the repository.

    Each checkpoint is loaded into the network first, so one that does not fit fails here, not in
    the server. Files are hard-linked where possible (the fp32 and amp models share a checkpoint)
    and written under a temporary name, then renamed.
    """
    network_def = read_network_def(bundle_dir)
    installed = []
    for resolution in sorted(RESOLUTIONS):
        source = checkpoint_path(bundle_dir, resolution)
        load_checkpoint(build_network(network_def), source)
        # the torch variants the repository has (torch_fp16 only where perf/gpu_session.py added it)
        models = [Path(model_repository) / network_model_name(resolution, v) for v in TORCH_VARIANTS]
        models = [m for m in models if m.joinpath("config.pbtxt").exists()]
        if not models:
            raise BundleError(f"{model_repository} has no PyTorch network model of the {resolution} checkpoint "
                              f"(segresnet_{resolution}_torch_*/config.pbtxt)")
        for model in models:
            version_dir = model / "1"
            version_dir.mkdir(exist_ok=True)
            target = version_dir / source.name
            if not (target.exists() and os.path.samefile(source, target)):
                with atomic_path(target) as partial:
                    partial.unlink()  # a new name of the source's file (its mode stays), or a copy
                    try:
                        os.link(source, partial)
                    except OSError:
                        shutil.copyfile(source, partial)
            (version_dir / "network_def.json").write_text(json.dumps(network_def, indent=2) + "\n")
            installed.append(target)
    return installed


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser (its subcommands make-test and install); tests/test_docs.py parses the docs' commands."""
    parser = argparse.ArgumentParser(prog="python -m wholebody.bundle", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-test", help="write a bundle directory with seeded random weights")
    make.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    make.add_argument("--init-filters", type=int, default=32, help="32 is the real network; 8 is ~16x faster")
    make.add_argument("--seed", type=int, default=0)
    install = sub.add_parser(
        "install", help="put a bundle's checkpoints into the PyTorch network models of a model repository"
    )
    install.add_argument("--bundle", type=Path, required=True, help="MONAI bundle directory")
    install.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "install":
        try:
            for path in install_bundle(args.bundle, args.model_repository):
                log.info("installed %s", path)
        except BundleError as exc:
            log.error("error: %s", exc)
            return 2
        return 0
    out = make_test_bundle(args.out, init_filters=args.init_filters, seed=args.seed)
    log.info("wrote test bundle %s (init_filters=%d, seed=%d)", out, args.init_filters, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
