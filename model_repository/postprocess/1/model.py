"""Triton stage 3: labels back on the input grid, as the bundle's Invertd(nearest_interp=True).

Checks its own request (also when sent directly): label maps within the ensemble's size limits (the
output's size comes from `oriented_shape`), finite invertible affines."""

from __future__ import annotations

from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from wholebody.contract import AFFINE, LABEL_MAP, ORIENTED_AFFINE, ORIENTED_SHAPE, RESAMPLED_AFFINE, RESAMPLED_LABEL_MAP
from wholebody.postprocessing import invert_to_input_grid
from wholebody.triton_python import PythonModel, input_tensor, output_tensor
from wholebody.validation import check_affine


class TritonPythonModel(PythonModel):
    def handle(self, request: Any) -> list[Any]:
        cpu = torch.device("cpu")
        oriented_shape = input_tensor(request, ORIENTED_SHAPE, cpu).tolist()
        self.limits.check_input(oriented_shape, ORIENTED_SHAPE)
        names = (RESAMPLED_AFFINE, ORIENTED_AFFINE, AFFINE)
        affines = [check_affine(input_tensor(request, name, cpu).numpy(), name) for name in names]
        resampled = pb_utils.get_input_tensor_by_name(request, RESAMPLED_LABEL_MAP)
        self.limits.check_resampled(resampled.shape(), RESAMPLED_LABEL_MAP)
        label_map = input_tensor(request, RESAMPLED_LABEL_MAP, self.device)
        label_map = invert_to_input_grid(label_map, affines[0], affines[1], oriented_shape, affines[2])
        return [output_tensor(LABEL_MAP, label_map)]
