"""The repository's model configs read with Triton's own schema, and which models a configuration loads.

The one parser of config.pbtxt files on the launcher and tools side (`model_config`, `parameters_of`,
`config_parameters`, `is_ensemble`): tritonclient's `model_config_pb2.ModelConfig` and protobuf's text
format, as tritonserver itself reads them. A model.py inside Triton's Python stub gets its config from
Triton as JSON instead (`args["model_config"]`), as do `get_model_config(..., as_json=True)` callers:
`json_parameters` reads the parameters of that form. The parameter values are then checked by
`wholebody.validation` (`choice_parameter`, `int_parameter`, ...). No Triton server, no torch here.

With `placement: in_process` in the sliding-window stage's config, that stage builds the torch
network itself from the network model's folder (its weights and config parameters): the torch
network models then need not be loaded (each would be an idle stub process holding PyTorch and the
weights, ~0.2-0.3 GB on the CPU). They stay in the repository, loadable for BLS and for
perf_analyzer's model-computation row (`--load-model=segresnet_lowres_torch_fp32`, or
`python -m wholebody.triton_server serve --model ...`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import text_format

from wholebody.contract import SLIDING_WINDOW, TORCH_VARIANTS

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig


def parse_model_config(text: str) -> ModelConfig:
    """Config text (the config.pbtxt format) parsed with Triton's own protobuf schema.

    Raises google.protobuf.text_format.ParseError (with line and column) when it does not fit the schema.
    """
    from tritonclient.grpc import model_config_pb2  # Triton's schema, no server needed

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def model_config(config_path: Path) -> ModelConfig:
    """A config.pbtxt parsed with Triton's own protobuf schema (OSError, text_format.ParseError if bad)."""
    return parse_model_config(Path(config_path).read_text())


def parameters_of(config: ModelConfig) -> dict[str, str]:
    """A parsed config's `parameters` as {key: string_value} (also a `get_model_config(...).config`)."""
    return {key: value.string_value for key, value in config.parameters.items()}


def json_parameters(config: Mapping[str, Any]) -> dict[str, str]:
    """The `parameters` of a model config in Triton's JSON form (a Python model's `args["model_config"]`,
    parsed; `get_model_config(..., as_json=True)["config"]`) as {key: string_value}."""
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def config_parameters(config_path: Path) -> dict[str, str]:
    """The `parameters` of a config.pbtxt as {key: string_value} (OSError, text_format.ParseError)."""
    return parameters_of(model_config(config_path))


def is_ensemble(config: ModelConfig) -> bool:
    """Whether a parsed config is an ensemble (`platform: "ensemble"`): it runs wherever its steps do."""
    return config.platform == "ensemble"


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
    return config_parameters(config_path(Path(model_repository) / SLIDING_WINDOW, config_name)).get("placement") or "bls"


def holds_bundle(version_dir: Path, checkpoint: str) -> bool:
    """Whether a torch network model's version folder holds an installed bundle: `network_def.json` and the
    checkpoint file its config names (`checkpoint` parameter; "" never does). Read without torch."""
    files = (version_dir / "network_def.json", version_dir / checkpoint)
    return bool(checkpoint) and all(f.is_file() for f in files)


def is_torch_network_model(name: str) -> bool:
    """segresnet_<resolution>_torch_<precision>: served by the Python backend from the checkpoint."""
    return name.startswith("segresnet_") and name.endswith(TORCH_VARIANTS)


def models_with_config(model_repository: Path, config_name: str | None) -> list[str]:
    """Models that have `configs/<config_name>.pbtxt`, plus the ensembles (they run anywhere), sorted.

    On a CPU box this leaves out GPU-only models (the TensorRT plans) that would fail to load.
    `config_name=None`: every model that has a config.pbtxt. Raises text_format.ParseError for a
    config.pbtxt that does not fit Triton's schema (read to tell an ensemble).
    """
    names = []
    for model_dir in sorted(p for p in Path(model_repository).iterdir() if p.is_dir()):
        config = model_dir / "config.pbtxt"
        if config_name is None:
            if config.exists():
                names.append(model_dir.name)
        elif (model_dir / "configs" / f"{config_name}.pbtxt").exists():
            names.append(model_dir.name)
        elif config.exists() and is_ensemble(model_config(config)):
            names.append(model_dir.name)
    return names


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
