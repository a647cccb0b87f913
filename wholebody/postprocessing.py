"""Putting a label map back on the input grid, as the bundle's `Invertd(nearest_interp=True)` does.

MONAI inverts Spacing by resampling (nearest, border padding, float64 as the forward Spacing ran)
from the resampled grid to the RAS-oriented input grid, then inverts Orientation by flipping and
permuting the axes back. Its resampler (`monai.transforms.spatial.functional.spatial_resample` ->
`monai.networks.layers.AffineTransform`) does, for an output of shape [X, Y, Z]:

1. `xform = np.linalg.solve(src_affine, dst_affine)` (float64), unless the two grids are equal within
   `AFFINE_TOL` (then the labels are returned unchanged);
2. `theta = to_norm_affine(xform, src_shape, dst_shape)` with its rows and columns reversed;
3. `torch.nn.functional.affine_grid(theta[:, :3], [1, 1, X, Y, Z])`: a float64 base grid of
   `linspace(-1, 1, n) * (n - 1) / n` per axis, times `theta.T` by one batched matrix product;
4. `grid_sample(labels as float64, grid, "nearest", "border", align_corners=False)`.

That float64 grid alone is 3 x 8 bytes per output voxel (2.5 GB for 512x512x400). Here the same
four steps are run with the same torch operations, but on slabs of the output along its first axis:
every output row's coordinates come from the same base-grid values and the same K=4 product, and
`grid_sample` treats every sampling point on its own, so each slab's labels equal MONAI's bit for bit
(checked against `Invertd` on random labels for every kind of affine in tests/test_inversion.py).
Like MONAI it samples the labels converted to float64 (8 bytes per label voxel).

When `xform` has exactly zero off-diagonal terms (axis-aligned grids, where MONAI's rotation part is
a diagonal matrix, not merely close to one), each coordinate depends on its own axis' index only:
`0 * x` is an exact zero in every term of the product, so one line of points per axis gives the
same indices as the full grid (`grid_sample` computes each axis' index from that axis' coordinate
alone, so it is asked for indices by sampling a 1-D index ramp). That fast path needs three index
vectors instead of a grid.
Float32 storage noise in a NIfTI affine (off-diagonals ~1e-8) is not zero for MONAI: such grids take
the general path.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import AFFINE_TOL
from monai.networks.utils import to_norm_affine
from monai.transforms import Orientation
from monai.transforms.utils_pytorch_numpy_unification import allclose

#: Output voxels sampled at once by the general path; 64 bytes of temporaries per voxel (base
#: grid, coordinates, sampled values, float64), so 134 MB at this size.
DEFAULT_CHUNK_VOXELS = 1 << 21


def _normalized_theta(xform: torch.Tensor, src_shape: Sequence[int], dst_shape: Sequence[int]) -> torch.Tensor:
    """MONAI's `AffineTransform(normalized=False, reverse_indexing=True)` theta, [1, 3, 4] float64."""
    theta = to_norm_affine(
        affine=xform[None].clone(), src_size=list(src_shape), dst_size=list(dst_shape), align_corners=False
    )
    reverse = torch.as_tensor([2, 1, 0], device=theta.device)
    theta[:, :3] = theta[:, reverse]
    theta[:, :, :3] = theta[:, :, reverse]
    return theta[:, :3]


def _base_line(size: int, device: torch.device) -> torch.Tensor:
    """`linspace_from_neg_one` of ATen's affine_grid (align_corners=False), float64."""
    if size <= 1:
        return torch.zeros(1, dtype=torch.float64, device=device)
    return torch.linspace(-1, 1, size, dtype=torch.float64, device=device) * (size - 1) / size


def _sample_indices(
    grid: torch.Tensor, src_shape: Sequence[int], axes: Sequence[int] = (0, 1, 2)
) -> list[torch.Tensor]:
    """Source index along each of `axes` that `grid_sample(nearest, border)` picks at each point of `grid`.

    grid_sample computes each axis' index from that axis' coordinate and size alone (unnormalize,
    clip to the border, round half to even), so sampling a ramp that varies along one axis only
    returns exactly the index it would read there from the full label map.

    grid: [1, d, h, w, 3] float64 (x = last array axis, as affine_grid makes it).
    Returns one int64 tensor of shape [d, h, w] per axis.
    """
    indices = []
    for axis in axes:
        size = int(src_shape[axis])
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = size
        ramp = torch.arange(size, dtype=torch.float64, device=grid.device).reshape(shape)
        picked = torch.nn.functional.grid_sample(ramp, grid, mode="nearest", padding_mode="border", align_corners=False)
        indices.append(picked[0, 0].to(torch.int64))
    return indices


def resample_nearest(
    label_map: torch.Tensor,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
) -> torch.Tensor:
    """Resample a label map to another grid, nearest, exactly as MONAI's `SpatialResample` in float64.

    Args:
        label_map: [X, Y, Z] integer labels (any integer dtype, CPU or CUDA) on the grid of `src_affine`.
        src_affine, dst_affine: [4, 4] voxel -> world (mm) of the source and the destination grid.
        dst_shape: the destination's [X', Y', Z'].
        chunk_voxels: output voxels sampled at once by the general (non-separable) path; bounds its
            memory (64 bytes per voxel, plus 8 per voxel of `label_map`), does not change the result.

    Returns:
        [X', Y', Z'] labels of `label_map`'s dtype and device.

    Raises:
        ValueError: `src_affine` is not invertible.
    """
    device = label_map.device
    dst_shape = tuple(int(s) for s in dst_shape)
    src_shape = tuple(int(s) for s in label_map.shape)
    src = torch.as_tensor(np.asarray(src_affine, np.float64))
    dst = torch.as_tensor(np.asarray(dst_affine, np.float64))
    try:
        xform_np = np.linalg.solve(src.numpy(), dst.numpy())
    except np.linalg.LinAlgError as error:
        raise ValueError(f"label affine is not invertible: {src.numpy().tolist()}") from error
    same_size = src_shape == dst_shape
    if same_size and (
        allclose(src, dst, atol=AFFINE_TOL)
        or allclose(torch.as_tensor(xform_np), torch.eye(4, dtype=torch.float64), atol=AFFINE_TOL)
    ):
        return label_map.clone()  # MONAI's spatial_resample leaves such an image as it is
    xform = torch.as_tensor(xform_np).to(device=device, dtype=torch.float64)
    theta_t = _normalized_theta(xform, src_shape, dst_shape).transpose(1, 2)  # [1, 4, 3]
    lines = [_base_line(n, device) for n in dst_shape]  # MONAI's D, H, W = our X, Y, Z

    rotation = xform_np[:3, :3]
    if not np.any(rotation - np.diag(np.diag(rotation))):
        # Separable: coordinate a of point (i, j, k) is the product of the row (.., 1) with theta's
        # column a, whose other spatial entries are exact zeros; evaluate it on one line per axis.
        index = []
        for axis in range(3):
            base = torch.zeros(1, dst_shape[axis], 4, dtype=torch.float64, device=device)
            base[0, :, 2 - axis] = lines[axis]
            base[0, :, 3] = 1
            grid = base.bmm(theta_t).reshape(1, dst_shape[axis], 1, 1, 3)
            index.append(_sample_indices(grid, src_shape, (axis,))[0].reshape(-1))
        return label_map[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]

    # The general path: MONAI's grid, one slab of output rows at a time. The base grid's columns for
    # the last two axes and the constant 1 are the same in every slab: filled once.
    out = torch.empty(dst_shape, dtype=label_map.dtype, device=device)
    source = label_map.to(torch.float64)[None, None]  # as MONAI samples it (labels < 2**53 are exact)
    plane = dst_shape[1] * dst_shape[2]
    step = min(dst_shape[0], max(1, int(chunk_voxels) // max(plane, 1)))
    base = torch.empty(1, step, dst_shape[1], dst_shape[2], 4, dtype=torch.float64, device=device)
    base[..., 0] = lines[2]
    base[..., 1] = lines[1][:, None]
    base[..., 3] = 1
    grid = torch.empty(1, step * plane, 3, dtype=torch.float64, device=device)
    for start in range(0, dst_shape[0], step):
        rows = min(step, dst_shape[0] - start)
        base[:, :rows, ..., 2] = lines[0][start : start + rows, None, None]
        slab_grid = grid[:, : rows * plane]
        torch.bmm(base[:, :rows].reshape(1, rows * plane, 4), theta_t, out=slab_grid)
        picked = torch.nn.functional.grid_sample(
            source,
            slab_grid.view(1, rows, dst_shape[1], dst_shape[2], 3),
            mode="nearest",
            padding_mode="border",
            align_corners=False,
        )
        out[start : start + rows] = picked[0, 0]
    return out


def invert_to_input_grid(
    label_map: torch.Tensor,
    label_affine: np.ndarray,
    oriented_affine: np.ndarray,
    oriented_shape: Sequence[int],
    input_affine: np.ndarray,
    chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
) -> torch.Tensor:
    """Labels on the resampled RAS grid -> labels on the input file's grid (shape and voxel order).

    Args:
        label_map: [X, Y, Z] integer labels on the grid of `label_affine`.
        label_affine: the affine after Spacing.
        oriented_affine, oriented_shape: the input grid after Orientation(RAS), before Spacing.
        input_affine: the input file's affine (its axis codes are restored).
        chunk_voxels: see `resample_nearest`.

    Returns:
        labels of `label_map`'s dtype on the input grid, in the input's voxel order.
    """
    on_oriented = resample_nearest(label_map, label_affine, oriented_affine, oriented_shape, chunk_voxels)
    axcodes = "".join(nib.orientations.aff2axcodes(np.asarray(input_affine, np.float64)))
    restored = Orientation(axcodes=axcodes)(
        MetaTensor(on_oriented[None], affine=torch.as_tensor(oriented_affine, dtype=torch.float64))
    )
    return torch.as_tensor(restored)[0].contiguous()
