"""What every serving stage checks before it works: the caller's mistakes and the server's size limits.

No Triton in here. A stage raises `InvalidRequestError` for anything the caller can fix (the Triton
layer answers it as INVALID_ARGUMENT / HTTP 400, so clients do not retry it) and lets every other
exception through as an internal fault (INTERNAL / HTTP 500).

The size limits have one home: the parameters `max_input_voxels` and `max_resampled_voxels` of the
ensemble's config (`model_repository/wholebody_ct_segmentation/config.pbtxt`), where clients read them
with `get_model_config` and refuse an oversize volume before sending it; every stage reads the same
file at load (`read_size_limits`) and enforces them on its own inputs, so a direct request to an
internal model is bounded too.

Model config `parameters` ({key: string_value}) have one parser here too, for every stage, network and
placement: `required_parameter`, `choice_parameter`, `choices_parameter`, `int_parameter`, `float_parameter`
all raise `ConfigError` naming the parameter and its valid values (the model refuses to load).

No torch or MONAI either (numpy and protobuf): the client imports `estimated_resampled_voxels` from here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format

from wholebody.contract import ENSEMBLE
from wholebody.served_models import config_parameters

MAX_INPUT_VOXELS = "max_input_voxels"
MAX_RESAMPLED_VOXELS = "max_resampled_voxels"


class InvalidRequestError(ValueError):
    """The request cannot be served as sent; the message names what is wrong and the valid values."""


class RequestCancelled(Exception):
    """The request was cancelled (its client cancelled, timed out or went away): stop computing it."""


class ConfigError(ValueError):
    """A model's config parameter is missing or out of range (the model refuses to load)."""


def required_parameter(params: Mapping[str, str], key: str) -> str:
    """Parameter `key`, which must be set and non-empty. Raises ConfigError."""
    if params.get(key, "") == "":
        raise ConfigError(f"config.pbtxt must set parameter {key!r}")
    return params[key]


def choice_parameter(params: Mapping[str, str], key: str, choices: Sequence[str], default: str | None = None) -> str:
    """Parameter `key`, which must be one of `choices`; required unless a `default` is given (an empty
    value takes the default). Raises ConfigError."""
    value = required_parameter(params, key) if default is None else params.get(key) or default
    if value not in choices:
        raise ConfigError(f"parameter {key!r} must be one of {list(choices)}, got {value!r}")
    return value


def choices_parameter(params: Mapping[str, str], key: str, choices: Sequence[str]) -> list[str]:
    """Parameter `key` as a comma-separated list (blanks dropped, empty by default), each one of `choices`.
    Raises ConfigError."""
    values = [v.strip() for v in (params.get(key) or "").split(",") if v.strip()]
    unknown = [v for v in values if v not in choices]
    if unknown:
        raise ConfigError(f"parameter {key!r} names {unknown}; choose from {list(choices)}")
    return values


def int_parameter(params: Mapping[str, str], key: str, low: int, high: int, default: int | None = None) -> int:
    """Parameter `key` as an int in [low, high]; required unless `default` is given. Raises ConfigError."""
    text = params.get(key, "")
    if text == "":
        if default is None:
            raise ConfigError(f"config.pbtxt must set parameter {key!r} (an integer in [{low}, {high}])")
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"parameter {key!r} must be an integer, got {text!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"parameter {key!r} must be in [{low}, {high}], got {value}")
    return value


def float_parameter(
    params: Mapping[str, str], key: str, low: float, high: float, default: float | None = None, high_open: bool = False
) -> float:
    """Parameter `key` as a finite float in [low, high] (or [low, high) with `high_open`). Raises ConfigError."""
    text = params.get(key, "")
    interval = f"[{low}, {high}{')' if high_open else ']'}"
    if text == "":
        if default is None:
            raise ConfigError(f"config.pbtxt must set parameter {key!r} (a number in {interval})")
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"parameter {key!r} must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < low or value > high or (high_open and value == high):
        raise ConfigError(f"parameter {key!r} must be in {interval}, got {value}")
    return value


@dataclass(frozen=True)
class SizeLimits:
    """How large a volume this server accepts, in voxels.

    max_input_voxels: the CT as sent (and the label map returned on its grid).
    max_resampled_voxels: the CT after resampling to the resolution's spacing (what the sliding
        window and its ring of blended logits work on).
    """

    max_input_voxels: int
    max_resampled_voxels: int

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> SizeLimits:
        """From config parameters (strings); each must be an integer in [1, 2**40]. Raises ConfigError."""
        return cls(
            max_input_voxels=int_parameter(params, MAX_INPUT_VOXELS, 1, 2**40),
            max_resampled_voxels=int_parameter(params, MAX_RESAMPLED_VOXELS, 1, 2**40),
        )

    def check_input(self, shape: Sequence[int], what: str = "image") -> int:
        """Voxel count of a 3-D `shape` within max_input_voxels; raises InvalidRequestError otherwise."""
        voxels = check_3d_shape(shape, what)
        if voxels > self.max_input_voxels:
            raise InvalidRequestError(
                f"{what} has {voxels:,} voxels, above this server's limit of {self.max_input_voxels:,} "
                f"(shape {list(shape)}); crop it or raise the ensemble's {MAX_INPUT_VOXELS}"
            )
        return voxels

    def check_resampled(self, shape: Sequence[int], what: str = "resampled image") -> int:
        """Voxel count of a 3-D `shape` within max_resampled_voxels; raises InvalidRequestError otherwise."""
        voxels = check_3d_shape(shape, what)
        if voxels > self.max_resampled_voxels:
            raise InvalidRequestError(
                f"{what} has {voxels:,} voxels, above this server's limit of {self.max_resampled_voxels:,} "
                f"(shape {list(shape)}); use resolution 'lowres', crop the image, or raise the ensemble's "
                f"{MAX_RESAMPLED_VOXELS}"
            )
        return voxels


def check_3d_shape(shape: Sequence[int], what: str) -> int:
    """The voxel count of `shape`, which must have 3 axes of at least 1 voxel (InvalidRequestError)."""
    dims = [int(s) for s in shape]
    if len(dims) != 3:
        raise InvalidRequestError(f"{what} must be 3-D, got shape {dims}")
    if min(dims) < 1:
        raise InvalidRequestError(f"{what} has an empty axis: shape {dims}")
    return math.prod(dims)


def estimated_resampled_voxels(shape: Sequence[int], affine: np.ndarray, pixdim: Sequence[float]) -> int:
    """About how many voxels a volume of `shape` and `affine` has after resampling to `pixdim` (mm):
    what `max_resampled_voxels` bounds. Numpy only: the preprocess stage (server) and
    `client.segmentation_client.ServerLimits` (client, no torch) share this one estimate."""
    zooms = np.sqrt((np.asarray(affine, np.float64)[:3, :3] ** 2).sum(axis=0))
    return int(np.prod(np.ceil(np.asarray(shape, np.float64) * zooms / np.asarray(pixdim)) + 1))


def check_affine(matrix: np.ndarray, name: str = "affine") -> np.ndarray:
    """`matrix` as a finite, invertible 4x4 float64 affine (voxel -> mm); raises InvalidRequestError."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all() or abs(np.linalg.det(matrix[:3, :3])) < 1e-9:
        raise InvalidRequestError(f"{name} must be a finite, invertible 4x4 affine, got shape {list(matrix.shape)}")
    return matrix


def read_size_limits(model_dir: str | Path) -> SizeLimits:
    """The size limits of the ensemble config next to the model folder `model_dir` (a stage's own
    folder, Triton's `args["model_repository"]`). Raises ConfigError when it is missing or lacks them.
    """
    path = Path(model_dir).parent / ENSEMBLE / "config.pbtxt"
    try:
        parameters = config_parameters(path)
    except (OSError, text_format.ParseError) as exc:
        raise ConfigError(f"cannot read the size limits from {path}: {exc}") from exc
    return SizeLimits.from_parameters(parameters)


def write_size_limits(model_repository: Path, max_input_voxels: int, max_resampled_voxels: int) -> None:
    """Set the size limits in the ensemble config of `model_repository` (a copy, for tests and benchmarks)."""
    config = Path(model_repository) / ENSEMBLE / "config.pbtxt"
    text = config.read_text()
    for key, value in ((MAX_INPUT_VOXELS, max_input_voxels), (MAX_RESAMPLED_VOXELS, max_resampled_voxels)):
        text, count = re.subn(rf'(key: "{key}" value: \{{ string_value: )"\d+"', rf'\1"{int(value)}"', text)
        if count != 1:
            raise ConfigError(f"{config} does not set {key} once")
    config.write_text(text)
