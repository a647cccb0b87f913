"""The bundle's SegResNet as a plain callable, a batch of 96^3 windows in, logits out (no Triton here).

One loader for both placements of a torch network: a network model served on its own
(`wholebody.triton_python.TorchNetworkModel`, called by BLS) and the sliding-window stage running
the same network in its own process (`placement: in_process`), which reads the network model's
config parameters through `NetworkCache`. Either way the network comes from the same installed
files (`1/network_def.json` and the checkpoint) with the same parameters.

Precisions (parameter `precision`):
- `fp32`: float32, TF32 off (the bundle table's torch_fp32 definition);
- `amp`: float32 weights under autocast (fp16 on a GPU, bf16 on the CPU), the bundle's `amp=True`;
- `fp16`: `.half()` weights and activations, GPU only. On an H100 a forward of 4 windows took
  9.2 ms per window against 10.8 ms under autocast (`../shared/facts/measurements.md`).
`compile` (`none` or a `torch.compile` mode) compiles the network with TorchInductor for one batch
shape; `fixed_batch: N` pads every batch to N windows (zeros, cropped off again) so that one
compiled shape serves all, and the warm-up at load compiles it before the first request.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from google.protobuf import text_format

from wholebody.bundle import build_network, load_checkpoint
from wholebody.contract import IN_CHANNELS, ROI_SIZE, TORCH_VARIANTS, TRT_VARIANTS
from wholebody.layout import channels_last
from wholebody.served_models import holds_bundle, model_config, parameters_of
from wholebody.validation import (
    ConfigError,
    choice_parameter,
    choices_parameter,
    int_parameter,
    required_parameter,
)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "amp", "fp16")
# Where the sliding-window stage runs a torch network: sent by BLS to the network model, or in its
# own process (the sliding_window parameter `placement`).
PLACEMENTS = ("bls", "in_process")
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last_3d": torch.channels_last_3d}
# `none`, or a mode of torch.compile (TorchInductor). `reduce-overhead` adds CUDA graphs; its output
# is overwritten by the next call, which the sliding window allows (it blends a batch before asking
# for the next) and the network model handles by copying (`TorchNetwork.owned_output`).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
# `fixed_batch` at most: 1024 windows of 96^3 float32 are 3.6 GB of input alone, beyond any card's use here
MAX_FIXED_BATCH = 1024


@dataclass(frozen=True)
class NetworkSettings:
    """How a torch network model computes: its config `parameters`, parsed and checked.

    Raises ConfigError (a ValueError naming the parameter and its allowed values) for a bad value.
    """

    checkpoint: str
    precision: str = "fp32"
    memory_format: str = "contiguous"
    compile: str = "none"
    fixed_batch: int = 0  # 0: run each batch as it comes

    def __post_init__(self) -> None:  # settings made in code get the checks of those read from a config
        self._parse(self.parameters())

    def parameters(self) -> dict[str, str]:
        """These settings as config parameters ({key: string_value})."""
        return {"checkpoint": self.checkpoint, "precision": self.precision, "memory_format": self.memory_format,
                "compile": self.compile, "fixed_batch": str(self.fixed_batch)}

    @staticmethod
    def _parse(params: Mapping[str, str]) -> dict[str, Any]:
        """The constructor's arguments from config parameters, checked (ConfigError)."""
        return {
            "precision": choice_parameter(params, "precision", PRECISIONS),
            "checkpoint": required_parameter(params, "checkpoint"),
            "memory_format": choice_parameter(params, "memory_format", list(MEMORY_FORMATS), "contiguous"),
            "compile": choice_parameter(params, "compile", COMPILE_MODES, "none"),
            "fixed_batch": int_parameter(params, "fixed_batch", 0, MAX_FIXED_BATCH, default=0),
        }

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> NetworkSettings:
        """From a config's {key: string_value}; `precision` and `checkpoint` are required. Raises ConfigError."""
        return cls(**cls._parse(params))


def placement_parameters(params: Mapping[str, str]) -> tuple[str, list[str]]:
    """The sliding-window stage's `placement` and `preload_networks` parameters, checked.

    `placement`: `bls` (default) or `in_process`; `preload_networks`: comma-separated torch
    variants, only with `in_process`. Raises ConfigError naming the parameter and the fix, also for a
    `default_network` that is a TensorRT plan under `in_process` (plans run by BLS only).
    """
    placement = choice_parameter(params, "placement", PLACEMENTS, "bls")
    preload = choices_parameter(params, "preload_networks", TORCH_VARIANTS)
    if preload and placement != "in_process":
        raise ConfigError("parameter 'preload_networks' needs placement 'in_process'")
    default = params.get("default_network", "")
    if placement == "in_process" and default in TRT_VARIANTS:
        raise ConfigError(f"default_network {default!r} is a TensorRT plan: it runs by BLS only; set placement 'bls' "
                         f"or a torch default_network ({', '.join(TORCH_VARIANTS)})")
    return placement, preload


class TorchNetwork:
    """The network of one network model's version folder, on `device`, ready to call.

    Args:
        version_dir: holds `network_def.json` and the checkpoint `settings.checkpoint`.
        settings: precision, memory format, compile mode, fixed batch.
        device: where it runs; `fp16` and `compile` need a CUDA device (ConfigError otherwise).

    Raises FileNotFoundError when the bundle is not installed there.
    """

    def __init__(self, version_dir: Path, settings: NetworkSettings, device: torch.device) -> None:
        network_def_path = version_dir / "network_def.json"
        checkpoint = version_dir / settings.checkpoint
        if not network_def_path.exists() or not checkpoint.exists():
            raise FileNotFoundError(
                f"{version_dir} lacks network_def.json or {checkpoint.name}: install a bundle with "
                "`python -m wholebody.bundle install --bundle DIR`"
            )
        if device.type != "cuda" and (settings.precision == "fp16" or settings.compile != "none"):
            raise ConfigError("precision 'fp16' and 'compile' need a GPU instance (KIND_GPU); on the CPU use "
                              "precision fp32 or amp and compile none")
        self.settings, self.device, self.checkpoint = settings, device, checkpoint
        self.dtype = torch.float16 if settings.precision == "fp16" else torch.float32
        self.memory_format = MEMORY_FORMATS[settings.memory_format]
        network = load_checkpoint(build_network(json.loads(network_def_path.read_text())), checkpoint)
        network = network.to(device=device, dtype=self.dtype)
        if self.memory_format == torch.channels_last_3d:
            example = torch.randn(1, IN_CHANNELS, 32, 32, 32, generator=torch.Generator().manual_seed(0))
            network = channels_last(network, example.to(device, self.dtype))
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.eager = network
        self.network = network if settings.compile == "none" else torch.compile(
            network, mode=settings.compile, dynamic=False
        )
        self.autocast_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

    def __call__(self, windows: torch.Tensor) -> torch.Tensor:
        """Logits [B, C, *roi] of windows [B, 1, *roi] (any float dtype, any device).

        The logits are float16 for `fp16`, float16 (GPU) or bfloat16 (CPU) under `amp`, float32
        for `fp32`, on this network's device. With `fixed_batch` a batch of other size is padded
        with zero windows (or split) to that size.
        """
        count, fixed = int(windows.shape[0]), self.settings.fixed_batch
        if fixed and count > fixed:
            return torch.cat([self(part) for part in torch.split(windows, fixed)])
        windows = windows.to(device=self.device, dtype=self.dtype)
        if fixed and count < fixed:
            windows = torch.cat([windows, windows.new_zeros((fixed - count, *windows.shape[1:]))])
        with torch.inference_mode(), torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.settings.precision == "amp"
        ):
            logits = self.network(windows.contiguous(memory_format=self.memory_format))
        return logits[:count]

    @property
    def owned_output(self) -> bool:
        """False when the next call overwrites this call's logits (CUDA graphs): copy them to keep them."""
        return self.settings.compile != "reduce-overhead"

    def warm_up(self) -> float:
        """Run the batch shape requests will use (compiling it, autotuning cuDNN); returns seconds."""
        start = time.perf_counter()
        shape = (self.settings.fixed_batch or 1, IN_CHANNELS, *ROI_SIZE)
        try:
            for _ in range(3 if self.settings.compile == "reduce-overhead" else 1):  # graphs record on a later call
                self(torch.zeros(shape, device=self.device))
        except Exception:
            if self.network is self.eager:
                raise
            # A compiler failure (no C compiler, no Triton kernels for this GPU) must not stop serving.
            log.exception("torch.compile(mode=%r) failed for %s; serving the eager network", self.settings.compile,
                          self.checkpoint)
            self.network = self.eager
            self(torch.zeros(shape, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start


def model_parameters(config_path: Path) -> dict[str, str]:
    """The `parameters` of a torch network model's config.pbtxt as {key: string_value} (Triton's schema).

    Raises ConfigError when the model is not served by the Python backend (a TensorRT plan), OSError and
    text_format.ParseError when the file cannot be read or parsed.
    """
    config = model_config(config_path)
    if config.backend != "python":
        raise ConfigError(f"{config.name or config_path.parent.name} is not a PyTorch network model "
                          f"(platform {config.platform or config.backend!r}): it runs by BLS only")
    return parameters_of(config)


def installed_torch_network(
    repository: Path, model_name: str, config_file: str = "config.pbtxt", version: str = "1"
) -> bool:
    """Whether `model_name` is a torch network model of `repository` whose version folder holds an
    installed bundle (network_def.json and the checkpoint its config names): what the sliding-window
    stage needs to run it in-process. False for TensorRT plans and anything missing; never raises."""
    config = Path(repository) / model_name / config_file
    if model_name.endswith(TRT_VARIANTS) or not config.exists():
        return False
    try:
        checkpoint = NetworkSettings.from_parameters(model_parameters(config)).checkpoint
    except (ValueError, text_format.ParseError):  # a bad or non-torch config: not servable in-process
        return False
    return holds_bundle(Path(repository) / model_name / version, checkpoint)


class NetworkCache:
    """Torch network models of a repository loaded into this process, by model name.

    Each comes from `<repository>/<model>/<version>/` with the parameters of `<model>/<config_file>`
    (the network model's own config: same checkpoint, precision, layout, compile mode).
    """

    def __init__(
        self, repository: Path, device: torch.device, config_file: str = "config.pbtxt", version: str = "1",
        logger: logging.Logger = log,
    ) -> None:
        self.repository, self.device, self.config_file, self.version = Path(repository), device, config_file, version
        self.logger = logger
        self.networks: dict[str, TorchNetwork] = {}

    def available(self, model_name: str) -> bool:
        """Whether `model_name` is loaded here or can be (see `installed_torch_network`)."""
        return model_name in self.networks or installed_torch_network(
            self.repository, model_name, self.config_file, self.version
        )

    def get(self, model_name: str) -> TorchNetwork:
        """The loaded, warmed-up network of `model_name` (loaded on first use).

        Raises ValueError for a model that is not a torch network model of the repository.
        """
        if model_name.endswith(TRT_VARIANTS):
            raise ValueError(f"{model_name} is a TensorRT plan: it runs by BLS only (sliding_window's placement 'bls')")
        if model_name not in self.networks:
            model_dir = self.repository / model_name
            config = model_dir / self.config_file
            if not config.exists():
                raise ValueError(f"no network model {model_name!r} in {self.repository} (no {self.config_file})")
            settings = NetworkSettings.from_parameters(model_parameters(config))
            network = TorchNetwork(model_dir / self.version, settings, self.device)
            # as the network model does: compile (and cuDNN's autotuning) before the first request; an
            # eager CPU network has nothing to warm up (a forward there costs seconds)
            seconds = network.warm_up() if settings.compile != "none" or self.device.type == "cuda" else 0.0
            self.logger.info(
                "in-process network %s: %s (%s, %s, compile %s, batch %s) on %s, warm-up %.1f s",
                model_name, network.checkpoint.name, settings.precision, settings.memory_format,
                settings.compile, settings.fixed_batch or "any", self.device, seconds,
            )
            self.networks[model_name] = network
        return self.networks[model_name]
