"""Bundle loading: the real layout, checkpoint formats, clear errors; the channels-last serving layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wholebody.bundle import (
    BundleError,
    build_network,
    copy_model_repository,
    install_bundle,
    load_network,
    main,
    read_network_def,
)
from wholebody.contract import NUM_CLASSES, RESOLUTIONS
from wholebody.layout import ContiguousPointwiseConv, channels_last


def test_test_bundle_has_the_real_layout(test_bundle: Path) -> None:
    assert (test_bundle / "configs" / "inference.json").is_file()
    for resolution in RESOLUTIONS.values():
        assert (test_bundle / "models" / resolution.checkpoint).is_file()
    network_def = read_network_def(test_bundle)
    assert network_def["_target_"] == "SegResNet" and network_def["out_channels"] == NUM_CLASSES


def test_resolutions_have_different_weights(test_bundle: Path) -> None:
    high, low = (load_network(test_bundle, r).state_dict() for r in ("highres", "lowres"))
    assert not torch.equal(high["convInit.conv.weight"], low["convInit.conv.weight"])


@pytest.mark.parametrize("wrap", ["model_dict", "module_prefix"])
def test_checkpoint_formats_monai_saves_are_accepted(test_bundle: Path, tmp_path: Path, wrap: str) -> None:
    state = torch.load(test_bundle / "models" / "model_lowres.pt", weights_only=True)
    wrapped = {"model": state} if wrap == "model_dict" else {f"module.{k}": v for k, v in state.items()}
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    (bundle / "configs" / "inference.json").write_text((test_bundle / "configs" / "inference.json").read_text())
    torch.save(wrapped, bundle / "models" / "model_lowres.pt")
    network = load_network(bundle, "lowres")
    assert torch.equal(network.state_dict()["convInit.conv.weight"], state["convInit.conv.weight"])


def test_a_checkpoint_that_does_not_fit_names_the_keys(test_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "models").mkdir(parents=True)
    (bundle / "configs").mkdir()
    network_def = read_network_def(test_bundle)
    (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": network_def}))
    state = build_network(network_def).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["convInit.conv.weight"]
    torch.save(state, bundle / "models" / "model.pt")
    with pytest.raises(BundleError, match=r"missing keys: convInit\.conv\.weight.*unexpected keys: extra\.weight"):
        load_network(bundle, "highres")


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="inference.json not found"):
        read_network_def(tmp_path)


def test_install_cli_puts_weights_in_the_torch_models(test_bundle: Path, tmp_path: Path) -> None:
    repo = copy_model_repository(tmp_path / "repo")
    assert main(["install", "--bundle", str(test_bundle), "--model-repository", str(repo)]) == 0
    version = repo / "segresnet_lowres_torch_amp" / "1"
    assert (version / "model_lowres.pt").is_file() and (version / "network_def.json").is_file()
    assert main(["install", "--bundle", str(tmp_path / "nowhere"), "--model-repository", str(repo)]) == 2
    installed = install_bundle(test_bundle, repo)
    torch_models = list(repo.glob("segresnet_*_torch_*/config.pbtxt"))  # torch_fp16 only in the GPU session's copy
    assert len(installed) == len(torch_models) >= len(RESOLUTIONS) and not list(repo.rglob("*.partial"))


def test_channels_last_network_returns_contiguous_logits(test_bundle: Path) -> None:
    network = load_network(test_bundle, "lowres")
    window = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = network(window)
    fast = channels_last(network, torch.randn(1, 1, 32, 32, 32))
    assert isinstance(fast.get_submodule("conv_final.2.conv"), ContiguousPointwiseConv)
    with torch.inference_mode():
        logits = fast(window.contiguous(memory_format=torch.channels_last_3d))
    assert logits.is_contiguous()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_channels_last_keeps_a_last_convolution_that_is_not_pointwise() -> None:
    network = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 1), torch.nn.Conv3d(4, 3, 3, padding=1)).eval()
    fast = channels_last(network, torch.randn(1, 1, 8, 8, 8))
    assert all(isinstance(m, torch.nn.Conv3d) for m in fast)
