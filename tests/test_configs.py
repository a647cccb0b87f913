"""Every config.pbtxt parses with Triton's own protobuf schema and the ensemble's wiring holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tritonclient.grpc import model_config_pb2

from wholebody import contract
from wholebody.contract import MODEL_REPOSITORY
from wholebody.served_models import model_config, parameters_of, parse_model_config

CONFIG_FILES = sorted(MODEL_REPOSITORY.glob("*/config.pbtxt")) + sorted(MODEL_REPOSITORY.glob("*/configs/*.pbtxt"))
SHARED_LABELS = Path(__file__).resolve().parents[2] / "shared" / "data" / "wholebody_labels.json"


def load_models() -> dict[str, model_config_pb2.ModelConfig]:
    return {p.parent.name: model_config(p) for p in MODEL_REPOSITORY.glob("*/config.pbtxt")}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(MODEL_REPOSITORY)))
def test_config_parses_and_names_its_folder(path: Path) -> None:
    config = model_config(path)
    folder = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert config.name == folder.name


def test_every_model_folder_has_a_version_directory() -> None:
    for config in MODEL_REPOSITORY.glob("*/config.pbtxt"):
        assert (config.parent / "1").is_dir(), f"{config.parent.name} lacks 1/"


def _tensors(config: model_config_pb2.ModelConfig, which: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    return {t.name: (t.data_type, tuple(t.dims)) for t in getattr(config, which)}


def test_ensemble_wiring_is_consistent() -> None:
    models = load_models()
    ensemble = models[contract.ENSEMBLE]
    assert ensemble.platform == "ensemble"
    available = _tensors(ensemble, "input")
    for step in ensemble.ensemble_scheduling.step:
        model = models[step.model_name]
        inputs, outputs = _tensors(model, "input"), _tensors(model, "output")
        optional = {t.name for t in model.input if t.optional}
        assert set(step.input_map) <= set(inputs), f"{step.model_name}: unknown inputs"
        assert set(inputs) - set(step.input_map) <= optional, f"{step.model_name}: required input not fed"
        for key, value in step.input_map.items():
            assert value in available, f"{step.model_name}.{key} <- {value}: nothing produces {value}"
            assert available[value] == inputs[key], f"{step.model_name}.{key}: dtype/dims differ from {value}"
        for key, value in step.output_map.items():
            assert key in outputs, f"{step.model_name} has no output {key}"
            available[value] = outputs[key]
    for name, spec in _tensors(ensemble, "output").items():
        assert available.get(name) == spec, f"ensemble output {name} is not produced as declared"


def test_optional_ensemble_inputs_reach_optional_stage_inputs() -> None:
    models = load_models()
    ensemble = models[contract.ENSEMBLE]
    optional = {t.name for t in ensemble.input if t.optional}
    assert optional == {contract.RESOLUTION, contract.NETWORK}
    for step in ensemble.ensemble_scheduling.step:
        stage_optional = {t.name for t in models[step.model_name].input if t.optional}
        for key, value in step.input_map.items():
            if value in optional:
                assert key in stage_optional, f"{step.model_name}.{key} must be optional"


def test_int16_ensemble_is_the_ensemble_with_an_int16_image() -> None:
    models = load_models()
    main, twin = models[contract.ENSEMBLE], models[contract.ENSEMBLE_INT16]
    expected = model_config_pb2.ModelConfig()
    expected.CopyFrom(main)
    expected.name = contract.ENSEMBLE_INT16
    expected.ClearField("parameters")  # label names and layout notes live in the main ensemble only
    image = next(t for t in expected.input if t.name == contract.IMAGE)
    image.name, image.data_type = contract.IMAGE_INT16, model_config_pb2.TYPE_INT16
    step = expected.ensemble_scheduling.step[0]
    assert step.model_name == contract.PREPROCESS and step.input_map.pop(contract.IMAGE) == contract.IMAGE
    step.input_map[contract.IMAGE_INT16] = contract.IMAGE_INT16
    assert twin == expected
    preprocess = {t.name: t for t in models[contract.PREPROCESS].input}
    assert preprocess[contract.IMAGE].optional and preprocess[contract.IMAGE_INT16].optional


def test_contract_names_match_configs() -> None:
    from perf.gpu_session import torch_fp16_config

    models = load_models()
    for resolution in contract.RESOLUTIONS:  # generated for the GPU session only, held to the same contract
        name = contract.network_model_name(resolution, "torch_fp16")
        assert name not in models, f"{name} is unmeasured on a GPU: perf/gpu_session.py generates it"
        models[name] = parse_model_config(torch_fp16_config(resolution))
        assert models[name].name == name
    ensemble = models[contract.ENSEMBLE]
    assert _tensors(ensemble, "input")[contract.IMAGE][1] == (-1, -1, -1)
    assert set(_tensors(ensemble, "output")) == {contract.LABEL_MAP}
    for resolution in contract.RESOLUTIONS:
        for variant in contract.TORCH_VARIANTS:
            network = models[contract.network_model_name(resolution, variant)]
            assert network.max_batch_size >= 1
            assert network.HasField("dynamic_batching")
            fp32 = model_config_pb2.TYPE_FP32
            assert _tensors(network, "input") == {contract.WINDOW: (fp32, (contract.IN_CHANNELS, *contract.ROI_SIZE))}
            assert _tensors(network, "output") == {contract.LOGITS: (fp32, (contract.NUM_CLASSES, *contract.ROI_SIZE))}


def test_cpu_configs_differ_from_gpu_configs_only_in_placement_and_defaults() -> None:
    tunable = {"default_resolution", "default_network", "sw_batch_size", "memory_format", "huge_pages",
               "placement", "preload_networks", "blend_dtype", "network_config"}
    for cpu_path in MODEL_REPOSITORY.glob("*/configs/cpu.pbtxt"):
        gpu, cpu = model_config(cpu_path.parent.parent / "config.pbtxt"), model_config(cpu_path)
        assert [g.kind for g in gpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
        assert [g.kind for g in cpu.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_CPU]
        for config in (gpu, cpu):
            config.ClearField("instance_group")
            for key in tunable:
                config.parameters.pop(key, None)
        assert gpu == cpu, f"{cpu_path} drifted from its config.pbtxt"


def test_label_names_are_served_in_bundle_order() -> None:
    ensemble = load_models()[contract.ENSEMBLE]
    names = ensemble.parameters[contract.LABEL_NAMES_PARAMETER].string_value.split(",")
    assert len(names) == contract.NUM_CLASSES
    assert names[0] == "background" and names[1] == "spleen" and names[104] == "urinary_bladder"
    assert len(set(names)) == len(names)
    if SHARED_LABELS.exists():  # the team's copy of the bundle's metadata, where it is at hand
        labels = json.loads(SHARED_LABELS.read_text())["labels"]
        assert names == [labels[str(i)] for i in range(len(labels))]


def test_size_limits_live_in_the_ensemble_config_only() -> None:
    limits = ("max_input_voxels", "max_resampled_voxels")
    ensemble = load_models()[contract.ENSEMBLE]
    assert all(int(ensemble.parameters[key].string_value) > 0 for key in limits)
    for path in CONFIG_FILES:
        if path.parent.name != contract.ENSEMBLE:
            assert not set(limits) & set(model_config(path).parameters), f"{path} repeats a size limit"


def test_sliding_window_placement_parameters_are_valid() -> None:
    """placement, blend_dtype and preload_networks take the values the stage accepts, in every config."""
    from wholebody.sliding_window import BLEND_DTYPES
    from wholebody.torch_network import placement_parameters

    folder = MODEL_REPOSITORY / contract.SLIDING_WINDOW
    placements = {}
    for path in [folder / "config.pbtxt", *folder.glob("configs/*.pbtxt")]:
        params = parameters_of(model_config(path))
        placements[path.name], preload = placement_parameters(params)  # what the stage parses at load
        assert params.get("blend_dtype", "float32") in BLEND_DTYPES
        assert params["default_network"] in contract.VARIANTS
        if placements[path.name] == "in_process":  # the network models' own config it reads exists for each
            for variant in {params["default_network"], *preload}:
                for resolution in contract.RESOLUTIONS:
                    network = MODEL_REPOSITORY / contract.network_model_name(resolution, variant)
                    assert (network / params.get("network_config", "config.pbtxt")).is_file()
    # the CPU default runs the network in the sliding-window stub; the GPU keeps its measured BLS default
    assert placements == {"config.pbtxt": "bls", "cpu.pbtxt": "in_process"}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"placement": "inside"}, "parameter 'placement' must be one of \\['bls', 'in_process'\\]"),
        ({"placement": "bls", "preload_networks": "torch_fp32"}, "'preload_networks' needs placement 'in_process'"),
        ({"placement": "in_process", "preload_networks": "trt_fp16"}, "'preload_networks' names \\['trt_fp16'\\]"),
        ({"placement": "in_process", "default_network": "trt_fp16"},
         "'trt_fp16' is a TensorRT plan: it runs by BLS only; set placement 'bls'"),
    ],
)
def test_bad_placement_parameters_are_refused(params: dict[str, str], message: str) -> None:
    from wholebody.torch_network import placement_parameters

    with pytest.raises(ValueError, match=message):
        placement_parameters(params)
    assert placement_parameters({}) == ("bls", [])


def test_the_cpu_default_does_not_load_the_network_models() -> None:
    """With the network in the sliding-window stub, the CPU default loads the two ensembles and three stages; the GPU default all."""
    from wholebody.served_models import models_to_load, models_with_config

    cpu = models_to_load(MODEL_REPOSITORY, "cpu", models_with_config(MODEL_REPOSITORY, "cpu"))
    assert cpu == sorted(
        [contract.ENSEMBLE, contract.ENSEMBLE_INT16, contract.PREPROCESS, contract.SLIDING_WINDOW, contract.POSTPROCESS]
    )
    every = [p.parent.name for p in MODEL_REPOSITORY.glob("*/config.pbtxt")]
    assert sorted(models_to_load(MODEL_REPOSITORY, None, every)) == sorted(every)


def test_every_parameter_parser_raises_config_error() -> None:
    """One parser of config parameters (wholebody.validation): stages, networks and placement all refuse
    a bad value with ConfigError naming the parameter, so the model refuses to load."""
    from wholebody.torch_network import NetworkSettings, placement_parameters
    from wholebody.validation import ConfigError, choice_parameter, choices_parameter, int_parameter, required_parameter

    bad: list[tuple[object, str]] = [
        (lambda: required_parameter({"k": ""}, "k"), "must set parameter 'k'"),
        (lambda: choice_parameter({"k": "c"}, "k", ("a", "b")), r"'k' must be one of \['a', 'b'\], got 'c'"),
        (lambda: choice_parameter({}, "k", ("a", "b")), "must set parameter 'k'"),
        (lambda: choices_parameter({"k": "a, x"}, "k", ("a", "b")), r"'k' names \['x'\]; choose from"),
        (lambda: int_parameter({"k": "2.5"}, "k", 0, 4), "'k' must be an integer"),
        (lambda: placement_parameters({"placement": "inside"}), "'placement' must be one of"),
        (lambda: NetworkSettings.from_parameters({"checkpoint": "m.pt", "precision": "fp8"}), "'precision' must be"),
        (lambda: NetworkSettings("m.pt", fixed_batch=-1), r"'fixed_batch' must be in \[0, "),
    ]
    for call, message in bad:
        with pytest.raises(ConfigError, match=message):
            call()  # type: ignore[operator]
    assert choice_parameter({"k": ""}, "k", ("a", "b"), default="b") == "b"
    assert choices_parameter({"k": " a,,b "}, "k", ("a", "b")) == ["a", "b"]
    settings = NetworkSettings.from_parameters({"checkpoint": "m.pt", "precision": "amp", "fixed_batch": "4"})
    assert NetworkSettings.from_parameters(settings.parameters()) == settings


def test_an_ensemble_is_told_by_its_parsed_platform(tmp_path: Path) -> None:
    """models_with_config reads the platform with Triton's schema: a comment naming the ensemble platform
    does not make a model an ensemble, and a differently spaced `platform:"ensemble"` still is one."""
    from wholebody.served_models import json_parameters, models_with_config

    configs = {
        "steps": '# platform: "ensemble" was its old name\nname: "steps"\nbackend: "python"\n',
        "chain": 'name: "chain"\nplatform:"ensemble"\n',
        "gpu_only": 'name: "gpu_only"\nplatform: "tensorrt_plan"\n',
        "cpu_too": 'name: "cpu_too"\nbackend: "python"\n',
    }
    for name, text in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(text)
    (tmp_path / "cpu_too" / "configs").mkdir()
    (tmp_path / "cpu_too" / "configs" / "cpu.pbtxt").write_text(configs["cpu_too"])
    assert models_with_config(tmp_path, "cpu") == ["chain", "cpu_too"]
    assert models_with_config(tmp_path, None) == sorted(configs)
    assert json_parameters({"parameters": {"a": {"string_value": "1"}}}) == {"a": "1"}
