"""Putting a label map back on the input grid, as the bundle's `Invertd(nearest_interp=True)` does.

MONAI inverts Spacing by resampling (nearest) from the resampled grid to the RAS-oriented input grid,
then inverts Orientation by flipping/permuting the axes back. Its resampling builds a float64
sampling grid of the output's size (3.3 GB for 512x512x397). When both grids are axis-aligned, which
they are after Orientation(RAS) unless the scanner's affine is oblique, nearest-neighbour resampling
is separable: each output index along an axis reads one source index, so it is done here with one
index vector per axis (picked by MONAI's own arithmetic) and no grid. Oblique affines go through
MONAI's `SpatialResample` whole.
"""

from __future__ import annotations

from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, SpatialResample

AXIS_ALIGNED_TOL = 1e-6


def _source_indices(xform: np.ndarray, axis: int, size_out: int, size_in: int, device: torch.device) -> torch.Tensor:
    """Nearest source index along `axis` for every output index, exactly as MONAI would pick it.

    Where a 3.0 mm grid is put back on a 1.5 mm one, half the output voxels lie exactly between two
    source voxels; which one MONAI picks there depends on the float64 rounding of its sampling grid.
    So the indices come from MONAI's own resampling of a 1-D index ramp along `axis` (the other
    axes of size 1): the same arithmetic as the full 3-D grid, since the transform is diagonal.
    """
    shape_in, shape_out = [1, 1, 1], [1, 1, 1]
    shape_in[axis], shape_out[axis] = size_in, size_out
    ramp = torch.arange(size_in, dtype=torch.float64).reshape(1, *shape_in)
    xform_axis = np.eye(4)
    xform_axis[axis, axis], xform_axis[axis, 3] = xform[axis, axis], xform[axis, 3]
    picked = SpatialResample(mode="nearest", padding_mode="border", dtype=torch.float64)(
        MetaTensor(ramp, affine=torch.eye(4, dtype=torch.float64)),
        dst_affine=torch.as_tensor(xform_axis),
        spatial_size=tuple(shape_out),
    )
    return torch.as_tensor(picked).reshape(-1).round().to(device=device, dtype=torch.int64)


def resample_nearest(
    label_map: torch.Tensor,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape: Sequence[int],
) -> torch.Tensor:
    """Resample a [X, Y, Z] label map from `src_affine` to the grid (dst_affine, dst_shape), nearest."""
    xform = np.linalg.solve(np.asarray(src_affine, np.float64), np.asarray(dst_affine, np.float64))
    off_diagonal = xform[:3, :3] - np.diag(np.diag(xform[:3, :3]))
    if np.abs(off_diagonal).max() <= AXIS_ALIGNED_TOL:
        index = [
            _source_indices(xform, a, int(dst_shape[a]), int(label_map.shape[a]), label_map.device) for a in range(3)
        ]
        return label_map[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]
    image = MetaTensor(label_map[None].to(torch.float32), affine=torch.as_tensor(src_affine, dtype=torch.float64))
    resampled = SpatialResample(mode="nearest", padding_mode="border", dtype=torch.float32)(
        image, dst_affine=torch.as_tensor(dst_affine, dtype=torch.float64), spatial_size=tuple(dst_shape)
    )
    return torch.as_tensor(resampled)[0].round().to(label_map.dtype)


def invert_to_input_grid(
    label_map: torch.Tensor,
    label_affine: np.ndarray,
    oriented_affine: np.ndarray,
    oriented_shape: Sequence[int],
    input_affine: np.ndarray,
) -> torch.Tensor:
    """Labels on the resampled RAS grid -> labels on the input file's grid (shape and voxel order).

    Args:
        label_map: [X, Y, Z] integer labels on the grid of `label_affine`.
        label_affine: the affine after Spacing.
        oriented_affine, oriented_shape: the input grid after Orientation(RAS), before Spacing.
        input_affine: the input file's affine (its axis codes are restored).
    """
    on_oriented = resample_nearest(label_map, label_affine, oriented_affine, oriented_shape)
    axcodes = "".join(nib.orientations.aff2axcodes(np.asarray(input_affine, np.float64)))
    restored = Orientation(axcodes=axcodes)(
        MetaTensor(on_oriented[None], affine=torch.as_tensor(oriented_affine, dtype=torch.float64))
    )
    return torch.as_tensor(restored)[0].contiguous()
