"""The torch network loader shared by both placements, and the fp16 blending ring (no server).

GPU-only checks (fp16 weights, torch.compile) skip without CUDA; the device session
(perf/gpu_session.sh) runs them on a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.inferers import sliding_window_inference

from perf.gpu_session import add_torch_fp16_models
from tests.test_pipeline import ROI, TinyNetwork
from wholebody.bundle import copy_model_repository, install_bundle, load_network
from wholebody.contract import RESOLUTIONS, TORCH_VARIANTS, network_model_name
from wholebody.sliding_window import sliding_window_label_map
from wholebody.torch_network import NetworkCache, NetworkSettings, TorchNetwork, model_parameters

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 weights, torch.compile)")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, test_bundle: Path) -> Path:
    repo = copy_model_repository(tmp_path_factory.mktemp("networks") / "model_repository")
    add_torch_fp16_models(repo)  # as the GPU session does
    install_bundle(test_bundle, repo)
    return repo


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"checkpoint": "model.pt"}, "must set parameter 'precision'"),
        ({"checkpoint": "model.pt", "precision": "fp8"}, "'precision' must be one of"),
        ({"checkpoint": "model.pt", "precision": "fp16", "compile": "fast"}, "'compile' must be one of"),
        ({"checkpoint": "model.pt", "precision": "fp16", "fixed_batch": "eight"}, "'fixed_batch' must be an integer"),
        ({"precision": "fp32"}, "must set parameter 'checkpoint'"),
    ],
)
def test_network_settings_name_the_bad_parameter(params: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NetworkSettings.from_parameters(params)


def test_fixed_batch_pads_and_splits_to_the_same_logits(repository: Path) -> None:
    version = repository / network_model_name("lowres", "torch_fp32") / "1"
    plain = TorchNetwork(version, NetworkSettings("model_lowres.pt"), torch.device("cpu"))
    fixed = TorchNetwork(version, NetworkSettings("model_lowres.pt", fixed_batch=2), torch.device("cpu"))
    windows = torch.randn(3, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))  # small: cheap on CPU
    expected = plain(windows)
    for count in (1, 3):
        logits = fixed(windows[:count])
        assert logits.shape == expected[:count].shape and logits.dtype == torch.float32
        torch.testing.assert_close(logits, expected[:count], rtol=1e-4, atol=1e-4)


def test_fp16_and_compile_are_refused_on_the_cpu(repository: Path) -> None:
    version = repository / network_model_name("lowres", "torch_fp16") / "1"
    with pytest.raises(ValueError, match="need a GPU instance"):
        TorchNetwork(version, NetworkSettings("model_lowres.pt", precision="fp16"), torch.device("cpu"))
    with pytest.raises(ValueError, match="need a GPU instance"):
        TorchNetwork(version, NetworkSettings("model_lowres.pt", compile="default"), torch.device("cpu"))


def test_every_torch_network_config_is_a_valid_setting(repository: Path) -> None:
    for resolution in RESOLUTIONS:
        for variant in TORCH_VARIANTS:
            folder = repository / network_model_name(resolution, variant)
            for config in [folder / "config.pbtxt", *folder.glob("configs/*.pbtxt")]:
                settings = NetworkSettings.from_parameters(model_parameters(config))
                assert settings.checkpoint == RESOLUTIONS[resolution].checkpoint
                if variant == "torch_fp16":
                    assert settings.precision == "fp16" and settings.compile != "none" and settings.fixed_batch == 8


def test_network_cache_loads_a_network_model_with_its_own_parameters(repository: Path, test_bundle: Path) -> None:
    cache = NetworkCache(repository, torch.device("cpu"), config_file="configs/cpu.pbtxt")
    name = network_model_name("lowres", "torch_fp32")
    network = cache.get(name)
    assert cache.get(name) is network  # loaded once
    config = repository / name / "configs" / "cpu.pbtxt"
    assert network.settings == NetworkSettings.from_parameters(model_parameters(config))
    windows = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = load_network(test_bundle, "lowres")(windows)
    torch.testing.assert_close(network(windows), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="need a GPU instance"):  # the fp16 model's config asks for a GPU
        NetworkCache(repository, torch.device("cpu")).get(network_model_name("lowres", "torch_fp16"))
    with pytest.raises(ValueError, match="TensorRT plan: it runs by BLS only"):
        cache.get(network_model_name("lowres", "trt_fp16"))
    with pytest.raises(ValueError, match="no network model 'segresnet_lowres_torch_bf16'"):
        cache.get("segresnet_lowres_torch_bf16")


def test_a_model_of_another_backend_is_refused_in_process(tmp_path: Path) -> None:
    folder = tmp_path / "segresnet_lowres_onnx"
    folder.mkdir()
    (folder / "config.pbtxt").write_text('name: "segresnet_lowres_onnx"\nbackend: "onnxruntime"\n')
    with pytest.raises(ValueError, match="runs by BLS only"):
        NetworkCache(tmp_path, torch.device("cpu")).get("segresnet_lowres_onnx")


@pytest.mark.parametrize("shape", [(120, 100, 170), (40, 30, 20)])
def test_fp16_ring_agrees_with_monai(shape: tuple[int, int, int]) -> None:
    torch.manual_seed(1)
    image = torch.randn(shape)
    network = TinyNetwork().eval()
    with torch.inference_mode():
        expected = sliding_window_inference(
            image[None, None], ROI, 2, network, overlap=0.25, mode="gaussian", padding_mode="replicate"
        )[0].argmax(0)
        labels = sliding_window_label_map(image, network, ROI, sw_batch_size=2, blend_dtype=torch.float16)
    assert labels.dtype == torch.uint8 and labels.shape == shape
    assert (labels.long() == expected).float().mean().item() > 0.999


def test_blend_dtype_is_checked() -> None:
    with pytest.raises(ValueError, match="blend_dtype"):
        sliding_window_label_map(torch.zeros(8, 8, 8), TinyNetwork(), ROI, blend_dtype=torch.bfloat16)


@needs_cuda
def test_compiled_fp16_network_matches_eager_fp32_on_gpu(repository: Path) -> None:
    version = repository / network_model_name("lowres", "torch_fp16") / "1"
    device = torch.device("cuda")
    params = model_parameters(version.parent / "config.pbtxt")
    fp16 = TorchNetwork(version, NetworkSettings.from_parameters(params), device)
    fp16.warm_up()
    fp32 = TorchNetwork(version, NetworkSettings("model_lowres.pt"), device)
    windows = torch.randn(3, 1, *ROI, generator=torch.Generator().manual_seed(0)).to(device)
    logits, expected = fp16(windows), fp32(windows)
    assert logits.dtype == torch.float16 and logits.shape == expected.shape
    agreement = (logits.argmax(1) == expected.argmax(1)).float().mean().item()
    print(json.dumps({"compiled_fp16_vs_fp32_argmax_agreement": agreement}))
    assert agreement > 0.99
