"""Triton stage 2: sliding-window inference to a uint8 label map, the network called by BLS (placement
`bls`) or run in this process (placement `in_process`).

Checks its own request (also when sent directly, not by the ensemble): a known resolution and network,
a network that is loaded (BLS) or installed (in-process), a finite 3-D image within the ensemble's
max_resampled_voxels."""

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
    RESOLUTIONS,
    RESOLVED_RESOLUTION,
    ROI_SIZE,
    TORCH_VARIANTS,
    VARIANTS,
    WINDOW,
    network_model_name,
)
from wholebody.sliding_window import BLEND_DTYPES, sliding_window_label_map
from wholebody.triton_python import (
    PythonModel,
    in_process_networks,
    input_tensor,
    optional_string,
    output_tensor,
)
from wholebody.validation import InvalidRequestError, choice_parameter, float_parameter, int_parameter

# MONAI's sliding_window_inference choices (BlendMode, PytorchPadMode)
BLEND_MODES = ("gaussian", "constant")
PADDING_MODES = ("constant", "reflect", "replicate", "circular")


class TritonPythonModel(PythonModel):
    def configure(self, args: dict[str, str]) -> None:
        self.default_network = choice_parameter(self.params, "default_network", list(VARIANTS))
        self.sw_batch_size = int_parameter(self.params, "sw_batch_size", 1, 64)
        self.overlap = float_parameter(self.params, "overlap", 0.0, 1.0, high_open=True)
        self.mode = choice_parameter(self.params, "mode", BLEND_MODES)
        self.padding_mode = choice_parameter(self.params, "padding_mode", PADDING_MODES)
        self.progress_every_s = float_parameter(self.params, "progress_log_interval_s", 0.1, 3600.0, default=10.0)
        self.blend_dtype = BLEND_DTYPES[choice_parameter(self.params, "blend_dtype", list(BLEND_DTYPES), "float32")]
        self.in_process = in_process_networks(self.params, args, self.device, self.logger)

    def checked_request(self, request: Any) -> tuple[str, torch.Tensor]:
        """The network model to call and the image, once the request passed every check."""
        resolution = optional_string(request, RESOLVED_RESOLUTION, "")
        if resolution not in RESOLUTIONS:
            raise InvalidRequestError(f"unknown resolution {resolution!r}; choose one of {sorted(RESOLUTIONS)}")
        variant = optional_string(request, NETWORK, self.default_network)
        if variant not in VARIANTS:
            raise InvalidRequestError(f"unknown network {variant!r}; choose one of {list(VARIANTS)}")
        model_name = network_model_name(resolution, variant)
        if self.in_process is not None:
            if variant not in TORCH_VARIANTS:
                raise InvalidRequestError(
                    f"network {variant!r} is a TensorRT plan: it runs by BLS only, and this server's sliding_window "
                    f"runs the network in-process (placement 'in_process'); choose one of {list(TORCH_VARIANTS)}"
                )
            if not self.in_process.available(model_name):
                raise InvalidRequestError(f"network {variant!r} ({model_name}) is not installed on this server")
        elif not pb_utils.is_model_ready(model_name):
            raise InvalidRequestError(f"network {variant!r} ({model_name}) is not loaded on this server")
        tensor = pb_utils.get_input_tensor_by_name(request, NORMALIZED_IMAGE)
        if tensor is None:
            raise InvalidRequestError(f"request has no input {NORMALIZED_IMAGE!r}")
        self.limits.check_resampled(tensor.shape(), NORMALIZED_IMAGE)
        image = input_tensor(request, NORMALIZED_IMAGE, self.device)
        if not bool(torch.isfinite(image).all()):
            raise InvalidRequestError(f"{NORMALIZED_IMAGE} has NaN or infinite voxels")
        return model_name, image

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
        model_name, image = self.checked_request(request)
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
            should_stop=request.is_cancelled,
        )
        return [output_tensor(RESAMPLED_LABEL_MAP, label_map)]
