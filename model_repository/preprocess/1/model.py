"""Triton stage 1: the bundle's preprocessing (RAS, spacing, intensity normalisation)."""

from __future__ import annotations

from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from wholebody.contract import (
    AFFINE,
    IMAGE,
    IMAGE_INT16,
    NORMALIZED_IMAGE,
    ORIENTED_AFFINE,
    ORIENTED_SHAPE,
    RESAMPLED_AFFINE,
    RESOLUTION,
    RESOLUTIONS,
    RESOLVED_RESOLUTION,
)
from wholebody.preprocessing import InvalidVolumeError, check_volume, estimated_resampled_voxels, preprocess
from wholebody.triton_python import (
    PythonModel,
    choice_parameter,
    input_tensor,
    optional_string,
    output_tensor,
    required_parameter,
    string_tensor,
)


def ct_image(request: Any, device: torch.device) -> torch.Tensor:
    """The request's CT as float32: `image` (FP32) or `image_int16` (INT16, cast exactly), exactly one."""
    given = [name for name in (IMAGE, IMAGE_INT16) if pb_utils.get_input_tensor_by_name(request, name) is not None]
    if len(given) != 1:
        raise InvalidVolumeError(
            f"send exactly one of the inputs {IMAGE!r} (FP32) and {IMAGE_INT16!r} (INT16), got {len(given)}"
        )
    # int16 -> float32 is exact: the same voxels as the bundle's LoadImage gives from an int16 file
    return input_tensor(request, given[0], device).to(torch.float32)


class TritonPythonModel(PythonModel):
    def configure(self, args: dict[str, str]) -> None:
        self.default_resolution = choice_parameter(self.params, "default_resolution", sorted(RESOLUTIONS))
        self.max_input_voxels = int(required_parameter(self.params, "max_input_voxels"))
        self.max_resampled_voxels = int(required_parameter(self.params, "max_resampled_voxels"))
        self.resample_dtype = getattr(torch, required_parameter(self.params, "resample_dtype"))

    def handle(self, request: Any) -> list[Any]:
        resolution = optional_string(request, RESOLUTION, self.default_resolution)
        if resolution not in RESOLUTIONS:
            raise InvalidVolumeError(f"unknown resolution {resolution!r}; choose one of {sorted(RESOLUTIONS)}")
        image = ct_image(request, self.device)
        affine = input_tensor(request, AFFINE, torch.device("cpu")).to(torch.float64)
        check_volume(image, affine, self.max_input_voxels)
        pixdim = RESOLUTIONS[resolution].pixdim
        resampled = estimated_resampled_voxels(image.shape, affine.numpy(), pixdim)
        if resampled > self.max_resampled_voxels:
            raise InvalidVolumeError(
                f"at {pixdim[0]} mm the image would have {resampled:,} voxels, above this server's limit of "
                f"{self.max_resampled_voxels:,}; use resolution 'lowres', crop the image, or raise max_resampled_voxels"
            )
        result = preprocess(image, affine, pixdim, resample_dtype=self.resample_dtype)
        return [
            output_tensor(NORMALIZED_IMAGE, result.image),
            output_tensor(RESAMPLED_AFFINE, result.affine.cpu()),
            output_tensor(ORIENTED_AFFINE, result.oriented_affine.cpu()),
            output_tensor(ORIENTED_SHAPE, torch.tensor(result.oriented_shape, dtype=torch.int64)),
            string_tensor(RESOLVED_RESOLUTION, resolution),
        ]
