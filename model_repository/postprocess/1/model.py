"""Triton stage 3: labels back on the input grid, as the bundle's Invertd(nearest_interp=True)."""

from __future__ import annotations

from typing import Any

import torch

from wholebody.contract import AFFINE, LABEL_MAP, ORIENTED_AFFINE, ORIENTED_SHAPE, RESAMPLED_AFFINE, RESAMPLED_LABEL_MAP
from wholebody.postprocessing import invert_to_input_grid
from wholebody.triton_python import PythonModel, input_tensor, output_tensor


class TritonPythonModel(PythonModel):
    def handle(self, request: Any) -> list[Any]:
        cpu = torch.device("cpu")
        label_map = input_tensor(request, RESAMPLED_LABEL_MAP, self.device)
        label_map = invert_to_input_grid(
            label_map,
            input_tensor(request, RESAMPLED_AFFINE, cpu).numpy(),
            input_tensor(request, ORIENTED_AFFINE, cpu).numpy(),
            input_tensor(request, ORIENTED_SHAPE, cpu).tolist(),
            input_tensor(request, AFFINE, cpu).numpy(),
        )
        return [output_tensor(LABEL_MAP, label_map)]
