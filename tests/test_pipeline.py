"""The pipeline's plain functions against MONAI's own (no server)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, Orientationd, Spacingd

from wholebody.memory import enable_huge_pages
from wholebody.postprocessing import invert_to_input_grid
from wholebody.preprocessing import InvalidVolumeError, check_volume, estimated_resampled_voxels, preprocess
from wholebody.sliding_window import sliding_window_label_map
from wholebody.validation import RequestCancelled

ROI = (96, 96, 96)


class TinyNetwork(torch.nn.Module):
    """A cheap stand-in predictor with spatially varying, window-dependent logits."""

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, classes, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-1, 1, x.shape[-1])
        return self.conv(x) + ramp * torch.arange(self.conv.out_channels).reshape(1, -1, 1, 1, 1) * 0.1


@pytest.mark.parametrize(
    ("shape", "sw_batch_size"),
    [((120, 100, 170), 1), ((120, 100, 170), 3), ((60, 130, 97), 2), ((96, 96, 96), 1), ((40, 30, 20), 1)],
)
def test_sliding_window_labels_equal_monai_argmax(shape: tuple[int, int, int], sw_batch_size: int) -> None:
    torch.manual_seed(1)
    image = torch.randn(shape)
    network = TinyNetwork().eval()
    with torch.inference_mode():
        expected = sliding_window_inference(
            image[None, None], ROI, sw_batch_size, network, overlap=0.25, mode="gaussian", padding_mode="replicate"
        )[0].argmax(0)
        calls: list[tuple[int, int]] = []
        labels = sliding_window_label_map(
            image, network, ROI, sw_batch_size=sw_batch_size, progress=lambda d, t: calls.append((d, t))
        )
    assert labels.dtype == torch.uint8 and labels.shape == shape
    assert (labels.long() == expected).float().mean().item() > 0.9999
    assert calls[-1][0] == calls[-1][1]


def test_sliding_window_rejects_a_predictor_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="predictor returned"):
        sliding_window_label_map(torch.zeros(96, 96, 96), lambda w: torch.zeros(1, 3, 10, 10, 10), ROI)


@pytest.mark.parametrize("sw_batch_size", [1, 2])
def test_sliding_window_stops_within_one_batch_when_asked(sw_batch_size: int) -> None:
    """A cancelled request stops before its next batch of windows: the predictor runs no more batches."""
    network = TinyNetwork().eval()
    batches: list[int] = []
    cancelled_after = 2  # the request is cancelled while its 2nd batch computes

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        batches.append(windows.shape[0])
        return network(windows)

    expected = rf"cancelled after {2 * sw_batch_size}/8 windows"
    with torch.inference_mode(), pytest.raises(RequestCancelled, match=expected):
        sliding_window_label_map(
            torch.randn(120, 120, 120), predictor, ROI, sw_batch_size=sw_batch_size,
            should_stop=lambda: len(batches) >= cancelled_after,
        )
    assert len(batches) == cancelled_after
    # never asked to stop: the same as without the hook
    with torch.inference_mode():
        image = torch.randn(100, 100, 100)
        plain = sliding_window_label_map(image, network, ROI)
        hooked = sliding_window_label_map(image, network, ROI, should_stop=lambda: False)
    assert torch.equal(plain, hooked)


def monai_inverse(labels: torch.Tensor, image: torch.Tensor, affine: np.ndarray, pixdim: float) -> np.ndarray:
    """What the bundle's Invertd(nearest_interp=True) makes of `labels` given on the resampled grid."""
    transform = Compose(
        [
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(pixdim,) * 3, mode="bilinear"),
        ]
    )
    data = transform({"image": MetaTensor(image, affine=torch.as_tensor(affine))})
    data["pred"] = MetaTensor(labels[None].float(), affine=data["image"].affine)
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)(data)
    return np.asarray(inverted["pred"])[0].round().astype(np.uint8)


AFFINES = {
    "ras_3mm": np.diag([3.0, 3.0, 3.0, 1.0]),
    "lps_like_0.8mm": np.array([[-0.8, 0, 0, 120.0], [0, -0.8, 0, 95.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]]),
    "permuted_1.5mm": np.array([[0, 1.5, 0, 0], [0, 0, -1.5, 10], [1.5, 0, 0, -5], [0, 0, 0, 1]]),
    "oblique": np.array([[0.98, -0.17, 0, 0], [0.17, 0.98, 0, 0], [0, 0, 1.2, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(AFFINES))
@pytest.mark.parametrize("pixdim", [1.5, 3.0])
def test_inversion_equals_monai_invertd(name: str, pixdim: float) -> None:
    affine = AFFINES[name]
    image = torch.rand(70, 50, 40)
    pre = preprocess(image, affine, (pixdim,) * 3)
    labels = torch.randint(0, 105, pre.image.shape, dtype=torch.uint8)
    ours = invert_to_input_grid(
        labels, pre.affine.numpy(), pre.oriented_affine.numpy(), pre.oriented_shape, affine
    ).numpy()
    expected = monai_inverse(labels, image, affine, pixdim)
    assert ours.shape == tuple(image.shape)
    agreement = (ours == expected).mean()
    assert agreement == 1.0, agreement  # every affine kind: tests/test_inversion.py


def test_preprocess_gives_the_bundle_grid_and_range() -> None:
    affine = np.array([[-0.8, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    image = torch.rand(100, 90, 30) * 2000 - 1000
    pre = preprocess(image, affine, (3.0, 3.0, 3.0))
    assert np.allclose(np.abs(np.diag(pre.affine.numpy())[:3]), 3.0)
    assert pre.affine[0, 0] > 0 and pre.affine[1, 1] > 0  # RAS
    assert pre.oriented_shape == (100, 90, 30)
    assert float(pre.image.min()) == pytest.approx(-1.0) and float(pre.image.max()) == pytest.approx(1.0)
    assert estimated_resampled_voxels(image.shape, affine, (3.0, 3.0, 3.0)) >= pre.image.numel()


@pytest.mark.parametrize(
    ("image", "affine", "message"),
    [
        (torch.zeros(10, 10), np.eye(4), "must be 3-D"),
        (torch.zeros(10, 0, 10), np.eye(4), "empty axis"),
        (torch.full((4, 4, 4), float("nan")), np.eye(4), "64 NaN or infinite voxels"),
        (torch.tensor([[[1.0, float("inf")]]]), np.eye(4), "1 NaN or infinite"),
        (torch.zeros(4, 4, 4, dtype=torch.int16), np.eye(4), "floating point"),
        (torch.zeros(4, 4, 4), np.zeros((4, 4)), "not invertible"),
        (torch.zeros(20, 20, 20), np.eye(4), "above this server's limit"),
    ],
)
def test_check_volume_says_what_is_wrong(image: torch.Tensor, affine: np.ndarray, message: str) -> None:
    with pytest.raises(InvalidVolumeError, match=message):
        check_volume(image, affine, max_voxels=1000)


def test_in_process_pipeline_equals_the_bundle_reference(aorta_ct, test_bundle, tmp_path) -> None:
    """The served functions, chained in one process with the contiguous fp32 network, give the
    reference's labels exactly on a real LPS CT with an axis shorter than a window."""
    import nibabel as nib

    from wholebody.bundle import load_network
    from wholebody.pipeline import segment
    from wholebody.reference import reference_segmentation

    crop = nib.load(aorta_ct).slicer[:, :, 80:130]
    path = tmp_path / "crop.nii.gz"
    nib.save(crop, path)
    network = load_network(test_bundle, "lowres")
    expected = reference_segmentation(path, network, "lowres").label_map
    with torch.inference_mode():
        labels = segment(torch.as_tensor(np.asarray(crop.dataobj, np.float32)), crop.affine, network, "lowres")
    assert np.array_equal(labels.numpy(), expected)


def test_huge_pages_follow_the_kernel_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    assert not enable_huge_pages(setting) and "THP_MEM_ALLOC_ENABLE" not in os.environ
    assert not enable_huge_pages(tmp_path / "missing")
    setting.write_text("always [madvise] never\n")
    assert enable_huge_pages(setting) and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
