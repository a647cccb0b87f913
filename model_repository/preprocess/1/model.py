"""Triton stage 1: the bundle's preprocessing (RAS, spacing, intensity normalisation)."""

from __future__ import annotations

from typing import Any

import torch

from wholebody.contract import (
    AFFINE,
    IMAGE,
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
        image = input_tensor(request, IMAGE, self.device)
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
