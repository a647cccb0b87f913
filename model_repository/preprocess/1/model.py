"""Triton stage 1: the bundle's preprocessing (RAS, spacing, intensity normalisation).

Refuses before any work: an unknown resolution or network, a network that is not loaded, a volume over
the size limits (from its shape), then a bad volume (check_volume)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from wholebody.contract import (
    AFFINE,
    IMAGE,
    IMAGE_INT16,
    NETWORK,
    NORMALIZED_IMAGE,
    ORIENTED_AFFINE,
    ORIENTED_SHAPE,
    RESAMPLED_AFFINE,
    RESOLUTION,
    RESOLUTIONS,
    RESOLVED_RESOLUTION,
    VARIANTS,
    network_model_name,
)
from wholebody.preprocessing import InvalidVolumeError, check_volume, estimated_resampled_voxels, preprocess
from wholebody.torch_network import installed_torch_network
from wholebody.triton_python import (
    PythonModel,
    input_tensor,
    optional_string,
    output_tensor,
    string_tensor,
)
from wholebody.validation import InvalidRequestError, choice_parameter


def ct_image_input(request: Any) -> str:
    """The name of the request's CT input: `image` (FP32) or `image_int16` (INT16); exactly one is sent."""
    given = [name for name in (IMAGE, IMAGE_INT16) if pb_utils.get_input_tensor_by_name(request, name) is not None]
    if len(given) != 1:
        raise InvalidVolumeError(
            f"send exactly one of the inputs {IMAGE!r} (FP32) and {IMAGE_INT16!r} (INT16), got {len(given)}"
        )
    return given[0]


class TritonPythonModel(PythonModel):
    def configure(self, args: dict[str, str]) -> None:
        self.default_resolution = choice_parameter(self.params, "default_resolution", sorted(RESOLUTIONS))
        self.repository = Path(args["model_repository"]).parent
        self.resample_dtype = getattr(torch, choice_parameter(self.params, "resample_dtype", ("float64", "float32")))

    def check_network(self, request: Any, resolution: str) -> None:
        """Refuse a named network that is unknown or not servable, before any preprocessing.

        Servable: its network model is loaded (BLS), or it is a torch network installed in the
        repository, which the sliding-window stage runs itself under `placement: in_process` (that
        stage checks its own placement again).
        """
        variant = optional_string(request, NETWORK, "")
        if not variant:
            return  # sliding_window's default_network
        if variant not in VARIANTS:
            raise InvalidRequestError(f"unknown network {variant!r}; choose one of {list(VARIANTS)}")
        name = network_model_name(resolution, variant)
        if pb_utils.is_model_ready(name) or installed_torch_network(self.repository, name):
            return
        loaded = [v for v in VARIANTS if pb_utils.is_model_ready(network_model_name(resolution, v))]
        raise InvalidRequestError(
            f"network {variant!r} ({name}) is not loaded on this server; loaded for {resolution}: {loaded}"
        )

    def handle(self, request: Any) -> list[Any]:
        resolution = optional_string(request, RESOLUTION, self.default_resolution)
        if resolution not in RESOLUTIONS:
            raise InvalidVolumeError(f"unknown resolution {resolution!r}; choose one of {sorted(RESOLUTIONS)}")
        self.check_network(request, resolution)
        image_input = ct_image_input(request)
        self.limits.check_input(pb_utils.get_input_tensor_by_name(request, image_input).shape())
        # int16 -> float32 is exact: the same voxels as the bundle's LoadImage gives from an int16 file
        image = input_tensor(request, image_input, self.device).to(torch.float32)
        affine = input_tensor(request, AFFINE, torch.device("cpu")).to(torch.float64)
        check_volume(image, affine, self.limits.max_input_voxels)
        pixdim = RESOLUTIONS[resolution].pixdim
        resampled = estimated_resampled_voxels(image.shape, affine.numpy(), pixdim)
        if resampled > self.limits.max_resampled_voxels:
            raise InvalidVolumeError(
                f"at {pixdim[0]} mm the image would have {resampled:,} voxels, above this server's limit of "
                f"{self.limits.max_resampled_voxels:,}; use resolution 'lowres', crop the image, or raise the "
                "ensemble's max_resampled_voxels"
            )
        result = preprocess(image, affine, pixdim, resample_dtype=self.resample_dtype)
        return [
            output_tensor(NORMALIZED_IMAGE, result.image),
            output_tensor(RESAMPLED_AFFINE, result.affine.cpu()),
            output_tensor(ORIENTED_AFFINE, result.oriented_affine.cpu()),
            output_tensor(ORIENTED_SHAPE, torch.tensor(result.oriented_shape, dtype=torch.int64)),
            string_tensor(RESOLVED_RESOLUTION, resolution),
        ]
