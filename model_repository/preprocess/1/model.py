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
    input_tensor,
    instance_device,
    model_logger,
    optional_string,
    output_tensor,
    parameters,
    required_parameter,
    respond_each,
    string_tensor,
)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.logger = model_logger(args)
        self.device = instance_device(args)
        params = parameters(args)
        self.default_resolution = required_parameter(params, "default_resolution")
        self.max_input_voxels = int(required_parameter(params, "max_input_voxels"))
        self.max_resampled_voxels = int(required_parameter(params, "max_resampled_voxels"))
        self.resample_dtype = getattr(torch, required_parameter(params, "resample_dtype"))
        if self.default_resolution not in RESOLUTIONS:
            raise ValueError(f"default_resolution must be one of {sorted(RESOLUTIONS)}")

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

    def execute(self, requests: list[Any]) -> list[Any]:
        return respond_each(requests, self.handle, self.logger)
