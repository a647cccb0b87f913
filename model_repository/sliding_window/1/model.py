"""Triton stage 2: sliding-window inference by BLS calls to a network model, to a uint8 label map."""

from __future__ import annotations

import time
from typing import Any

import torch
import triton_python_backend_utils as pb_utils

from wholebody.contract import (
    LOGITS,
    NETWORK,
    NORMALIZED_IMAGE,
    RESAMPLED_LABEL_MAP,
    RESOLVED_RESOLUTION,
    ROI_SIZE,
    VARIANTS,
    WINDOW,
    network_model_name,
)
from wholebody.sliding_window import BLEND_DTYPES, sliding_window_label_map
from wholebody.triton_python import (
    PythonModel,
    choice_parameter,
    in_process_networks,
    input_tensor,
    optional_string,
    output_tensor,
    required_parameter,
)


class TritonPythonModel(PythonModel):
    def configure(self, args: dict[str, str]) -> None:
        self.default_network = choice_parameter(self.params, "default_network", list(VARIANTS))
        self.sw_batch_size = int(required_parameter(self.params, "sw_batch_size"))
        self.overlap = float(required_parameter(self.params, "overlap"))
        self.mode = required_parameter(self.params, "mode")
        self.padding_mode = required_parameter(self.params, "padding_mode")
        self.progress_every_s = float(self.params.get("progress_log_interval_s", "10"))
        self.blend_dtype = BLEND_DTYPES[choice_parameter(self.params, "blend_dtype", list(BLEND_DTYPES), "float32")]
        self.in_process = in_process_networks(self.params, args, self.device, self.logger)

    def predictor(self, model_name: str):
        if self.in_process is not None:
            return self.in_process.get(model_name)

        def predict(windows: torch.Tensor) -> torch.Tensor:
            request = pb_utils.InferenceRequest(
                model_name=model_name,
                requested_output_names=[LOGITS],
                inputs=[output_tensor(WINDOW, windows)],
            )
            response = request.exec()
            if response.has_error():
                raise RuntimeError(f"{model_name}: {response.error().message()}")
            logits = pb_utils.get_output_tensor_by_name(response, LOGITS)
            return torch.from_dlpack(logits.to_dlpack())

        return predict

    def handle(self, request: Any) -> list[Any]:
        resolution = optional_string(request, RESOLVED_RESOLUTION, "")
        variant = optional_string(request, NETWORK, self.default_network)
        if variant not in VARIANTS:
            raise ValueError(f"unknown network {variant!r}; choose one of {list(VARIANTS)}")
        model_name = network_model_name(resolution, variant)
        image = input_tensor(request, NORMALIZED_IMAGE, self.device)
        started = last_log = time.monotonic()

        def progress(done: int, total: int) -> None:
            nonlocal last_log
            if time.monotonic() - last_log >= self.progress_every_s or done == total:
                last_log = time.monotonic()
                self.logger.info("%s: %d/%d windows, %.1f s", model_name, done, total, last_log - started)

        label_map = sliding_window_label_map(
            image,
            self.predictor(model_name),
            ROI_SIZE,
            sw_batch_size=self.sw_batch_size,
            overlap=self.overlap,
            mode=self.mode,
            padding_mode=self.padding_mode,
            progress=progress,
            blend_dtype=self.blend_dtype,
        )
        return [output_tensor(RESAMPLED_LABEL_MAP, label_map)]
