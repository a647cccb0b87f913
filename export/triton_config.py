"""The Triton side: which folder is a model repository, the config.pbtxt of a plan, installing a model.

A TensorRT network model is laid out as

    <repository>/segresnet_<resolution>_trt_<precision>/config.pbtxt
    <repository>/segresnet_<resolution>_trt_<precision>/1/model.plan
    <repository>/segresnet_<resolution>_trt_<precision>/1/validation.json   # how the plan compared with PyTorch
"""

from __future__ import annotations

import logging
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from wholebody.atomic import atomic_write_bytes
from wholebody.contract import IN_CHANNELS, LOGITS, NUM_CLASSES, ROI_SIZE, WINDOW

log = logging.getLogger(__name__)

VERSION = "1"
PLAN = "model.plan"
VALIDATION = "validation.json"
CONFIG = "config.pbtxt"


class NotAModelRepository(ValueError):
    """`--out` is not a Triton model repository; the message says why."""


def check_model_repository(path: Path) -> Path:
    """Return `path` if it is a model repository, by this rule: an existing directory that is named
    `model_repository` (this project's, possibly still empty) or that has at least one subfolder with a
    `config.pbtxt` (any populated Triton repository).

    Raises:
        NotAModelRepository: It does not exist, is not a directory, or fits neither condition.
    """
    path = Path(path)
    if not path.is_dir():
        raise NotAModelRepository(f"--out {path}: no such directory (it must be an existing Triton model repository)")
    if path.resolve().name != "model_repository" and not any(path.glob(f"*/{CONFIG}")):
        raise NotAModelRepository(
            f"--out {path}: not a Triton model repository (neither named model_repository nor holding "
            f"<model>/{CONFIG} folders)"
        )
    return path


def plan_config(name: str, max_batch: int, opt_batch: int, parameters: dict[str, str]) -> mc.ModelConfig:
    """The ModelConfig of a TensorRT network model (the contract's tensors, dynamic batching, one GPU instance).

    Args:
        name: The model's name, `wholebody.contract.network_model_name(resolution, variant)`.
        max_batch: The plan's largest batch (its profile's max); Triton's `max_batch_size`.
        opt_batch: The profile's opt batch; the preferred batch of the dynamic batcher.
        parameters: Provenance recorded as string parameters (TensorRT version, GPU, precision, md5, ...).
    """
    config = mc.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=max_batch)
    config.input.add(name=WINDOW, data_type=mc.TYPE_FP32, dims=[IN_CHANNELS, *ROI_SIZE])
    config.output.add(name=LOGITS, data_type=mc.TYPE_FP32, dims=[NUM_CLASSES, *ROI_SIZE])
    config.dynamic_batching.preferred_batch_size.append(opt_batch)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    for key, value in parameters.items():
        config.parameters[key].string_value = str(value)
    return config


def install_plan(repository: Path, config: mc.ModelConfig, plan: bytes, validation: str) -> Path:
    """Install a validated plan, its validation report and its config under `repository/<config.name>/`.

    Every file is written through a temporary name and renamed into place (plan last but config), so
    a Triton polling the repository never reads a half-written file.

    Returns:
        The model's folder.
    """
    model_dir = Path(repository) / config.name
    version_dir = model_dir / VERSION
    version_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(version_dir / VALIDATION, validation)
    atomic_write_bytes(version_dir / PLAN, plan)
    atomic_write_bytes(model_dir / CONFIG, text_format.MessageToString(config))
    log.info("installed %s (%.1f MB plan)", model_dir, len(plan) / 1e6)
    return model_dir
