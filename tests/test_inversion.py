"""The inversion (wholebody.postprocessing) against MONAI's Invertd on the bundle's transform chain.

Random labels on the resampled grid are the hard test: every sampling point that MONAI rounds
differently from us changes a label, including the half-voxel ties of exact spacing multiples.
Geometries: every affine kind a scanner or a converter produces, plus the ones of MONAI's own
Spacing tests (tests/transforms/test_spacing.py in Project-MONAI/MONAI).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, Orientationd, Spacingd, SpatialResample

from wholebody.postprocessing import invert_to_input_grid, resample_nearest
from wholebody.preprocessing import preprocess


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    x, y, z = axis
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array(
        [
            [c + x * x * (1 - c), x * y * (1 - c) - z * s, x * z * (1 - c) + y * s],
            [y * x * (1 - c) + z * s, c + y * y * (1 - c), y * z * (1 - c) - x * s],
            [z * x * (1 - c) - y * s, z * y * (1 - c) + x * s, c + z * z * (1 - c)],
        ]
    )


def _affine(matrix: np.ndarray, origin: tuple[float, float, float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = origin
    return affine


def _float32_noise(spacing: tuple[float, float, float], seed: int) -> np.ndarray:
    """An LPS-like axis-aligned affine whose direction cosines went through float32 (as NIfTI's
    quaternion/sform storage of a DICOM-converted scan does): off-diagonals of ~1e-8."""
    rotation = _rotation(np.random.default_rng(seed).normal(size=3), 1e-6)  # sub-micro-radian tilt
    matrix = (rotation @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(spacing)).astype(np.float32).astype(np.float64)
    return _affine(matrix, (180.25, 170.5, -301.0))


def _gantry_tilt(spacing: tuple[float, float, float], degrees: float) -> np.ndarray:
    """Slices stacked along a direction tilted in the y-z plane: a sheared (non-orthogonal) affine."""
    px, py, pz = spacing
    t = math.radians(degrees)
    return _affine(np.array([[-px, 0, 0], [0, -py, pz * math.sin(t)], [0, 0, pz * math.cos(t)]]), (100.0, 120.0, -50.0))


AFFINES: dict[str, np.ndarray] = {
    "axis_aligned_0.75mm": np.diag([0.75, 0.75, 0.75, 1.0]),
    "axis_aligned_1.5mm": _affine(np.diag([1.5, 1.5, 1.5]), (-10.0, 4.5, 7.25)),
    "flipped_lps_0.75mm": _affine(np.diag([-0.75, -0.75, 1.5]), (120.0, 95.0, -300.0)),
    "flipped_lps_0.8x2.5mm": _affine(np.diag([-0.8, -0.8, 2.5]), (120.0, 95.0, -300.0)),
    "permuted_1.5mm": np.array([[0, 1.5, 0, 0], [0, 0, -1.5, 10], [1.5, 0, 0, -5], [0, 0, 0, 1]]),
    "sheared_gantry_tilt_15deg": _gantry_tilt((0.75, 0.75, 1.5), 15.0),
    "sheared_gantry_tilt_-7deg": _gantry_tilt((0.7, 0.7, 3.0), -7.0),
    "rotated_oblique_20deg": _affine(
        _rotation(np.array([1.0, 2.0, 3.0]), 20.0) @ np.diag([0.75, 0.75, 1.5]), (3, -7, 11)
    ),
    "rotated_oblique_10deg_z": _affine(
        _rotation(np.array([0.0, 0.0, 1.0]), 10.0) @ np.diag([0.98, 0.98, 1.2]), (0, 0, 0)
    ),
    "nearly_aligned_0.75mm": _float32_noise((0.75, 0.75, 0.75), 1),
    "nearly_aligned_1.5mm": _float32_noise((1.5, 1.5, 1.5), 2),
    "nearly_aligned_0.75x1.5mm": _float32_noise((0.75, 0.75, 1.5), 3),
    # within MONAI's AFFINE_TOL (1e-3) of the 1.5 mm grid: Spacing and its inverse leave the voxels as they are
    "within_affine_tol_1.5mm": _affine(np.diag([1.5 * (1 - 1e-4)] * 3), (0.0004, -0.0003, 0.0)),
    # MONAI's tests/transforms/test_spacing.py
    "monai_spacing_sheared": np.array([[2, 1, 0, 4], [-1, -3, 0, 5], [0, 0, 2.0, 5], [0, 0, 0, 1]]),
    "monai_spacing_flipped": np.array([[-4, 0, 0, 4], [0, 5, 0, -5], [0, 0, 6, -6], [0, 0, 0, 1.0]]),
    "monai_spacing_diag": np.diag([-3.0, 0.2, 1.5, 1]),
    "monai_spacing_oblique": np.array(
        [[0.41, 0.005, 0.008, -79.7], [-0.0049, 0.592, 0.0664, -57.4], [-0.0073, -0.0972, 0.404, -32.1], [0, 0, 0, 1]]
    ),
    "monai_spacing_permuted": np.array([[0, 0, -1, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]]),
    "monai_spacing_near_identity": np.diag([1 - 1e-4, 1 - 1e-4, 1 - 1e-4, 1.0]),
}
SHAPE = (48, 40, 36)


def bundle_transforms(pixdim: float) -> Compose:
    """The bundle's spatial preprocessing (configs/inference.json), with its defaults (float64)."""
    return Compose(
        [
            EnsureChannelFirstd(keys="image", channel_dim="no_channel"),
            Orientationd(keys="image", axcodes="RAS"),
            Spacingd(keys="image", pixdim=(pixdim,) * 3, mode="bilinear"),
        ]
    )


def monai_invertd(transform: Compose, data: dict, labels: torch.Tensor) -> np.ndarray:
    """What the bundle's Invertd(nearest_interp=True) makes of `labels` given on the resampled grid."""
    data = dict(data)
    data["pred"] = MetaTensor(labels[None].to(torch.float32), affine=data["image"].affine)
    inverted = Invertd(keys="pred", transform=transform, orig_keys="image", nearest_interp=True)(data)
    return inverted["pred"].as_tensor()[0].cpu().numpy().round().astype(np.uint8)


@pytest.mark.parametrize("pixdim", [1.5, 3.0])
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_inversion_equals_invertd_on_random_labels(name: str, pixdim: float) -> None:
    affine = AFFINES[name]
    torch.manual_seed(0)
    image = torch.rand(SHAPE)
    transform = bundle_transforms(pixdim)
    data = transform({"image": MetaTensor(image, affine=torch.as_tensor(affine))})
    pre = preprocess(image, affine, (pixdim,) * 3)
    assert torch.equal(pre.affine, data["image"].affine.to(torch.float64))
    labels = torch.randint(0, 105, pre.image.shape, dtype=torch.uint8)
    expected = monai_invertd(transform, data, labels)
    for chunk_voxels in (1 << 21, 1000):  # one slab, and many slabs of a few rows
        ours = invert_to_input_grid(
            labels, pre.affine.numpy(), pre.oriented_affine.numpy(), pre.oriented_shape, affine, chunk_voxels
        ).numpy()
        assert ours.shape == SHAPE and ours.dtype == np.uint8
        equal = float((ours == expected).mean())
        assert equal == 1.0, f"{name} at {pixdim} mm, chunk {chunk_voxels}: {equal:.6%} equal"


@pytest.mark.parametrize("name", sorted(AFFINES))
def test_preprocessing_orientation_and_spacing_equal_the_bundle_transforms(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Orientation and Spacing are MONAI's own: the same voxels, bit for bit, and the same affine.

    The intensity steps are left out (replaced by identities): MONAI's float32 mean/std reductions
    themselves differ by one ulp from one call to the next on this machine.
    """
    import wholebody.preprocessing as pre_module

    class Identity:
        def __init__(self, **kwargs: object) -> None:
            pass

        def __call__(self, data: torch.Tensor) -> torch.Tensor:
            return data

    monkeypatch.setattr(pre_module, "NormalizeIntensity", Identity)
    monkeypatch.setattr(pre_module, "ScaleIntensity", Identity)
    affine = AFFINES[name]
    torch.manual_seed(1)
    image = torch.rand(SHAPE) * 2000 - 1000
    for pixdim in (1.5, 3.0):
        expected = bundle_transforms(pixdim)({"image": MetaTensor(image, affine=torch.as_tensor(affine))})["image"]
        pre = preprocess(image, affine, (pixdim,) * 3)
        assert torch.equal(pre.image, expected.as_tensor()[0].to(torch.float32)), (name, pixdim)
        assert torch.equal(pre.affine, expected.affine.to(torch.float64)), (name, pixdim)


def test_the_separable_path_is_taken_only_for_exact_zero_off_diagonals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact zeros take the index-vector path; float32 noise of 1e-8 takes the sampled grid."""
    sampled: list[int] = []
    original = torch.nn.functional.grid_sample

    def counting(source: torch.Tensor, grid: torch.Tensor, **kwargs: object) -> torch.Tensor:
        sampled.append(grid.shape[:-1].numel())
        return original(source, grid, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", counting)
    labels = torch.randint(0, 105, (20, 18, 16), dtype=torch.uint8)
    src = np.diag([3.0, 3.0, 3.0, 1.0])
    resample_nearest(labels, src, np.diag([1.5, 1.5, 1.5, 1.0]), (40, 36, 32))
    assert sampled == [40, 36, 32]  # one line per axis
    sampled.clear()
    noisy = np.diag([1.5, 1.5, 1.5, 1.0])
    noisy[0, 1] = 1e-8
    resample_nearest(labels, src, noisy, (40, 36, 32), chunk_voxels=36 * 32 * 16)
    assert sampled == [16 * 36 * 32, 16 * 36 * 32, 8 * 36 * 32]  # slabs of the whole grid


@pytest.mark.parametrize("degrees", [0.0, 1e-6, 12.5, 45.0])
def test_resample_nearest_equals_monai_spatial_resample_between_rotated_grids(degrees: float) -> None:
    """Beyond the bundle's chain (where the two grids share their directions): any two grids."""
    torch.manual_seed(2)
    labels = torch.randint(0, 105, (30, 26, 22), dtype=torch.uint8)
    src = _affine(np.diag([1.5, 1.5, 1.5]), (-20.0, -18.0, -15.0))
    dst = _affine(_rotation(np.array([0.3, -1.0, 0.5]), degrees) @ np.diag([0.75, 0.75, 1.5]), (-19.0, -17.5, -14.0))
    shape = (50, 44, 20)
    expected = SpatialResample(mode="nearest", padding_mode="border", dtype=torch.float64)(
        MetaTensor(labels[None].to(torch.float32), affine=torch.as_tensor(src)),
        dst_affine=torch.as_tensor(dst),
        spatial_size=shape,
    )
    expected = torch.as_tensor(expected)[0].round().to(torch.uint8)
    for chunk_voxels in (1 << 21, 500):
        assert torch.equal(resample_nearest(labels, src, dst, shape, chunk_voxels), expected), (degrees, chunk_voxels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name", ["nearly_aligned_0.75mm", "sheared_gantry_tilt_15deg", "rotated_oblique_20deg"])
def test_inversion_on_cuda_equals_invertd_on_cuda(name: str) -> None:
    """On a GPU both sides run MONAI's arithmetic on the device (cuBLAS, CUDA grid_sample)."""
    affine = AFFINES[name]
    torch.manual_seed(3)
    image = torch.rand(SHAPE, device="cuda")
    transform = bundle_transforms(1.5)
    data = transform({"image": MetaTensor(image, affine=torch.as_tensor(affine))})
    pre = preprocess(image, affine, (1.5,) * 3)
    labels = torch.randint(0, 105, pre.image.shape, dtype=torch.uint8, device="cuda")
    expected = monai_invertd(transform, data, labels)
    ours = invert_to_input_grid(
        labels, pre.affine.cpu().numpy(), pre.oriented_affine.cpu().numpy(), pre.oriented_shape, affine
    )
    assert ours.is_cuda
    assert float((ours.cpu().numpy() == expected).mean()) == 1.0
