"""Which models of the repository a configuration needs loaded (no Triton server, no torch here).

With `placement: in_process` in the sliding-window stage's config, that stage builds the torch
network itself from the network model's folder (its weights and config parameters): the torch
network models then need not be loaded (each would be an idle stub process holding PyTorch and the
weights, ~0.2-0.3 GB on the CPU). They stay in the repository, loadable for BLS and for
perf_analyzer's model-computation row (`--load-model=segresnet_lowres_torch_fp32`, or
`python -m wholebody.triton_server serve --model ...`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import text_format

from wholebody.contract import SLIDING_WINDOW, TORCH_VARIANTS

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig


def model_config(config_path: Path) -> ModelConfig:
    """A config.pbtxt parsed with Triton's own protobuf schema (google.protobuf.text_format.ParseError if bad)."""
    from tritonclient.grpc import model_config_pb2  # Triton's schema, no server needed

    return text_format.Parse(Path(config_path).read_text(), model_config_pb2.ModelConfig())


def config_parameters(config_path: Path) -> dict[str, str]:
    """The `parameters` of a config.pbtxt as {key: string_value} (OSError, text_format.ParseError)."""
    return {key: value.string_value for key, value in model_config(config_path).parameters.items()}


def config_path(model_dir: Path, config_name: str | None) -> Path:
    """The config Triton reads for `model_dir` under `--model-config-name=config_name`:
    `configs/<config_name>.pbtxt` where it exists, `config.pbtxt` otherwise."""
    if config_name:
        named = Path(model_dir) / "configs" / f"{config_name}.pbtxt"
        if named.exists():
            return named
    return Path(model_dir) / "config.pbtxt"


def sliding_window_placement(model_repository: Path, config_name: str | None) -> str:
    """The sliding-window stage's `placement` under that config: `bls` (the default) or `in_process`."""
    config = model_config(config_path(Path(model_repository) / SLIDING_WINDOW, config_name))
    placement = config.parameters.get("placement")
    return placement.string_value if placement is not None and placement.string_value else "bls"


def is_torch_network_model(name: str) -> bool:
    """segresnet_<resolution>_torch_<precision>: served by the Python backend from the checkpoint."""
    return name.startswith("segresnet_") and name.endswith(TORCH_VARIANTS)


def models_to_load(model_repository: Path, config_name: str | None, models: Iterable[str]) -> list[str]:
    """`models` without the torch network models when the sliding-window stage runs them in-process.

    Used by `make demo` and `python -m perf.reference_comparison`. `LocalTritonServer(models=None)`
    still loads every model that has the config (the tests' server: perf_analyzer's
    model-computation row needs the network models).
    """
    models = list(models)
    if SLIDING_WINDOW not in models or sliding_window_placement(model_repository, config_name) != "in_process":
        return models
    return [m for m in models if not is_torch_network_model(m)]
