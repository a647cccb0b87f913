"""The thin Triton layer shared by the Python-backend models of `model_repository/`.

Import this only inside a Triton Python backend stub: it needs `triton_python_backend_utils`.
Each model's `model.py` parses its config once in `initialize` (range-checked: a bad value fails the
load), then answers every request of a batch on its own (one bad request never fails the others) by
calling plain functions from `wholebody` that know nothing of Triton. A caller's mistake
(`InvalidRequestError`) answers INVALID_ARGUMENT / HTTP 400, anything else INTERNAL / HTTP 500.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from wholebody.contract import IN_CHANNELS, LOGITS, RESOLUTIONS, ROI_SIZE, WINDOW, network_model_name
from wholebody.memory import enable_huge_pages
from wholebody.served_models import json_parameters
from wholebody.torch_network import NetworkCache, NetworkSettings, TorchNetwork, placement_parameters
from wholebody.validation import (
    InvalidRequestError,
    RequestCancelled,
    SizeLimits,
    choice_parameter,
    read_size_limits,
)


def model_logger(args: dict[str, str]) -> logging.Logger:
    """A logger named after the model instance, writing to the stub's stderr (the server log)."""
    # The stub is this model's own process: keep MONAI's deprecation notices out of the server log.
    warnings.filterwarnings("ignore", message=".*Orientation.*labels", category=FutureWarning)
    warnings.filterwarnings("ignore", message="Setting affine, but the applied meta", category=UserWarning)
    logger = logging.getLogger(f"wholebody.{args['model_instance_name']}")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


def instance_device(args: dict[str, str]) -> torch.device:
    """cuda:N for a KIND_GPU instance, the CPU otherwise."""
    if args["model_instance_kind"] == "GPU":
        return torch.device("cuda", int(args["model_instance_device_id"]))
    return torch.device("cpu")


def apply_huge_pages(params: dict[str, str], logger: logging.Logger) -> None:
    """Honour the `huge_pages` parameter (`yes`/`no`, default `no`); call it before allocating tensors."""
    if choice_parameter(params, "huge_pages", ("yes", "no"), default="no") == "yes":
        if enable_huge_pages():
            logger.info("large tensors use transparent huge pages")
        else:
            logger.warning("huge_pages: yes, but the kernel has transparent huge pages off")


def input_tensor(request: Any, name: str, device: torch.device) -> torch.Tensor:
    """A request input as a torch tensor on `device` (zero-copy where DLPack allows)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise InvalidRequestError(f"request has no input {name!r}")
    return torch.from_dlpack(tensor.to_dlpack()).to(device)


def optional_string(request: Any, name: str, default: str) -> str:
    """A BYTES [1] input as str, or `default` when absent or empty."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InvalidRequestError(f"input {name!r} must hold one string, got {values.size}")
    value = values[0]
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text or default


def output_tensor(name: str, tensor: torch.Tensor) -> Any:
    """A torch tensor as a Triton output tensor, by DLPack (stays on its device).

    A CUDA tensor's stream is synchronised first: a DLPack capsule carries no stream, so Triton
    could otherwise read it before the kernels that write it have run (and compute times would
    stop at the kernel launches).
    """
    tensor = tensor.contiguous()
    if tensor.is_cuda:
        torch.cuda.current_stream(tensor.device).synchronize()
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(tensor))


def string_tensor(name: str, value: str) -> Any:
    return pb_utils.Tensor(name, np.array([value.encode()], dtype=np.object_))


def invalid_argument(message: str) -> Any:
    """An error response for the caller's mistake: gRPC INVALID_ARGUMENT, HTTP 400 (not retried)."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG))


def internal_error(message: str) -> Any:
    """An error response for a fault of the server: gRPC INTERNAL, HTTP 500."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL))


def cancelled_error(message: str) -> Any:
    """An error response for a request whose client has gone: gRPC CANCELLED."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.CANCELLED))


def respond_each(
    requests: Sequence[Any],
    handle: Callable[[Any], list[Any]],
    logger: logging.Logger,
    expected_errors: tuple[type[BaseException], ...] = (InvalidRequestError,),
) -> list[Any]:
    """One response per request: `handle(request)`'s output tensors, or that request's error.

    Errors of the `expected_errors` types are the caller's fault and go back as they are, as
    INVALID_ARGUMENT; anything else is logged with its traceback and reported as INTERNAL. A request
    already cancelled is not handled, and one cancelled while handled (`RequestCancelled`, raised by a
    loop asking `request.is_cancelled()`) answers CANCELLED; both are logged.
    """
    responses = []
    for request in requests:
        try:
            if request.is_cancelled():
                raise RequestCancelled("cancelled before it started")
            responses.append(pb_utils.InferenceResponse(output_tensors=handle(request)))
        except RequestCancelled as exc:
            logger.info("request %s", exc)
            responses.append(cancelled_error(f"request {exc}"))
        except expected_errors as exc:
            logger.info("rejected a request: %s", exc)
            responses.append(invalid_argument(str(exc)))
        except Exception as exc:  # reported to the client, traceback to the server log
            logger.exception("request failed")
            where = logger.name.removeprefix("wholebody.")
            responses.append(internal_error(f"internal error in {where}: {type(exc).__name__}: {exc}"))
    return responses


def release_cuda_cache(device: torch.device) -> None:
    """Give the CUDA memory this process cached but no longer uses back to the card.

    The stages run one after another on one card: memory a finished stage keeps cached (the
    preprocessing's float64 resampling, the sliding window's ring and activations) would add to
    the next stage's peak. Output tensors still held by Triton stay allocated.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class PythonModel:
    """What every Python-backend model of the repository does: `initialize` sets the instance's
    logger, device, config parameters and the server's size limits (`self.limits`, from the
    ensemble's config), applies `huge_pages`, then calls `configure`; `execute` answers each request
    with `handle`'s output tensors or that request's own error.

    `release_cuda_cache` (`yes`/`no`, default `no`): on a GPU instance, give the cached CUDA memory
    back after every batch of requests. Unmeasured: it lowers the card's peak when stages share it,
    and can slow the next request (its allocations start from the driver again).
    """

    def initialize(self, args: dict[str, str]) -> None:
        self.logger = model_logger(args)
        self.device = instance_device(args)
        self.params = json_parameters(json.loads(args["model_config"]))
        self.limits: SizeLimits = read_size_limits(args["model_repository"])
        apply_huge_pages(self.params, self.logger)
        self.release_cuda_cache = choice_parameter(self.params, "release_cuda_cache", ("yes", "no"), "no") == "yes"
        self.configure(args)

    def configure(self, args: dict[str, str]) -> None:
        """Read the model's own parameters (`self.params`) and load what it needs."""

    def handle(self, request: Any) -> list[Any]:
        raise NotImplementedError

    def execute(self, requests: list[Any]) -> list[Any]:
        responses = respond_each(requests, self.handle, self.logger)
        if self.release_cuda_cache:
            release_cuda_cache(self.device)
        return responses


class TorchNetworkModel(PythonModel):
    """A network model served by PyTorch: a batch of windows in, float32 logits out.

    The version folder holds `network_def.json` (the bundle's network_def) and the checkpoint named
    by the `checkpoint` parameter; `precision` (`fp32`, `amp`, `fp16`), `memory_format`, `compile`
    and `fixed_batch` are described in `wholebody.torch_network` (the same network the sliding-window
    stage loads with `placement: in_process`); `huge_pages: yes` backs the activations with
    transparent huge pages (fewer page faults per window). A compiled network is warmed up here, at
    load, so that the first request does not compile.
    """

    def configure(self, args: dict[str, str]) -> None:
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.max_batch_size = int(json.loads(args["model_config"]).get("max_batch_size", 0))
        settings = NetworkSettings.from_parameters(self.params)
        self.net = TorchNetwork(version_dir, settings, self.device)
        warm_up_s = self.net.warm_up() if settings.compile != "none" else 0.0
        self.logger.info(
            "serving %s (%s, %s, compile %s, warm-up %.1f s) on %s, %d CPU threads",
            self.net.checkpoint, settings.precision, settings.memory_format, settings.compile, warm_up_s,
            self.device, torch.get_num_threads(),
        )

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        logits = self.net(windows)
        if logits.dtype == torch.float32 and not self.net.owned_output:
            logits = logits.clone()
        return logits.float().contiguous()

    def execute(self, requests: list[Any]) -> list[Any]:
        # Dynamic batching: run the batch's windows in one forward, then split per request.
        responses: list[Any] = [None] * len(requests)
        batch, owners = [], []
        for index, request in enumerate(requests):
            try:
                windows = self.checked_windows(request)
                batch.append(windows)
                owners.append((index, windows.shape[0]))
            except InvalidRequestError as exc:
                responses[index] = invalid_argument(str(exc))
        if batch:
            try:
                logits = self.forward(torch.cat(batch))
                for (index, count), part in zip(owners, torch.split(logits, [c for _, c in owners])):
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[output_tensor(LOGITS, part)])
            except Exception as exc:
                self.logger.exception("forward failed")
                for index, _ in owners:
                    responses[index] = internal_error(f"network forward failed: {type(exc).__name__}: {exc}")
        return responses

    def checked_windows(self, request: Any) -> torch.Tensor:
        """The request's windows, [B, 1, *ROI_SIZE] float32 with 1 <= B <= max_batch_size, on the device.

        Triton checks the same from the config before the data is copied; this keeps the model safe
        under any config. Raises InvalidRequestError.
        """
        tensor = pb_utils.get_input_tensor_by_name(request, WINDOW)
        if tensor is None:
            raise InvalidRequestError(f"request has no input {WINDOW!r}")
        shape = list(tensor.shape())
        expected = [IN_CHANNELS, *ROI_SIZE]
        if len(shape) != 5 or shape[1:] != expected or not 1 <= shape[0] <= max(self.max_batch_size, 1):
            dims = ", ".join(map(str, expected))
            raise InvalidRequestError(f"{WINDOW} must be [B, {dims}] with 1 <= B <= {self.max_batch_size}, got {shape}")
        return input_tensor(request, WINDOW, self.device)

    def finalize(self) -> None:
        self.net = None  # type: ignore[assignment]


def in_process_networks(
    params: dict[str, str], args: dict[str, str], device: torch.device, logger: logging.Logger
) -> NetworkCache | None:
    """The sliding-window stage's `placement` of the network: None for `bls` (each batch of windows
    is sent to the network model), else the torch network models loaded into this process.

    Parameters: `placement` (`bls` default, or `in_process`: no logits leave the process, no stub
    and CUDA context of its own for the network); `network_config` (which config file of the
    network model's folder gives its parameters, default `config.pbtxt`); `preload_networks`
    (comma-separated torch variants loaded and warmed up here at load, for both resolutions; others
    load on first use). TensorRT plans are refused per request (they run by BLS only).
    """
    placement, preload = placement_parameters(params)
    if placement == "bls":
        return None
    repository = Path(args["model_repository"]).parent
    cache = NetworkCache(repository, device, params.get("network_config") or "config.pbtxt", logger=logger)
    for variant in preload:
        for resolution in sorted(RESOLUTIONS):
            cache.get(network_model_name(resolution, variant))
    return cache
