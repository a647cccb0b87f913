"""The bundle's preprocessing, as plain functions on torch tensors (CPU or CUDA).

configs/inference.json of the bundle: EnsureChannelFirst -> Orientation(RAS) -> Spacing(pixdim,
bilinear) -> NormalizeIntensity(nonzero=True) -> ScaleIntensity(-1, 1). MONAI's own transforms do the
work; this module adds the input checks a server needs and returns what the inversion needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import NormalizeIntensity, Orientation, ScaleIntensity, Spacing

# estimated_resampled_voxels lives with the size limits (torch-free, shared with the client); re-exported here
from wholebody.validation import InvalidRequestError, estimated_resampled_voxels


__all__ = ["InvalidVolumeError", "Preprocessed", "check_volume", "estimated_resampled_voxels", "preprocess"]


class InvalidVolumeError(InvalidRequestError):
    """The volume cannot be segmented; the message says what is wrong and how to fix it."""


def check_volume(image: torch.Tensor | np.ndarray, affine: torch.Tensor | np.ndarray, max_voxels: int) -> None:
    """Raise InvalidVolumeError unless `image` is a finite, non-empty 3-D volume with a usable affine."""
    shape = tuple(image.shape)
    if len(shape) != 3:
        raise InvalidVolumeError(f"image must be 3-D, got shape {list(shape)}")
    if min(shape) < 1:
        raise InvalidVolumeError(f"image has an empty axis: shape {list(shape)}")
    voxels = int(np.prod(shape))
    if voxels > max_voxels:
        raise InvalidVolumeError(
            f"image has {voxels:,} voxels, above this server's limit of {max_voxels:,} "
            f"(shape {list(shape)}); crop it or raise the ensemble's max_input_voxels"
        )
    values = torch.as_tensor(image)
    if not values.is_floating_point():
        raise InvalidVolumeError(f"image must be floating point, got {values.dtype}")
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InvalidVolumeError(f"image has {bad:,} NaN or infinite voxels of {voxels:,}")
    matrix = np.asarray(torch.as_tensor(affine).detach().cpu(), dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise InvalidVolumeError(f"affine must be a finite 4x4 matrix, got shape {list(matrix.shape)}")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-9 or not np.allclose(matrix[3], [0, 0, 0, 1]):
        raise InvalidVolumeError("affine is not invertible (zero voxel size or degenerate axes)")


@dataclass
class Preprocessed:
    """The network's input and the grids needed to put labels back on the input grid."""

    image: torch.Tensor  # [X, Y, Z] float32, RAS, at pixdim, intensity-normalised
    affine: torch.Tensor  # [4, 4] float64, the affine of `image`
    oriented_affine: torch.Tensor  # [4, 4] float64, the input grid after Orientation(RAS)
    oriented_shape: tuple[int, int, int]  # the input shape after Orientation(RAS)


def preprocess(
    image: torch.Tensor,
    affine: torch.Tensor | np.ndarray,
    pixdim: tuple[float, float, float],
    resample_dtype: torch.dtype = torch.float64,
) -> Preprocessed:
    """Apply the bundle's preprocessing to a [X, Y, Z] float32 volume on any device.

    Args:
        image: the CT in HU, in the file's voxel order.
        affine: voxel -> RAS world, as nibabel's `img.affine`.
        pixdim: target voxel spacing in mm (1.5 or 3.0 per axis).
        resample_dtype: precision of the bilinear resampling. float64 is MONAI's default and gives
            the bundle's labels; float32 halves the memory but can move labels where the network's
            class margins are small (see docs/faithfulness.md).
    """
    data = MetaTensor(image[None], affine=torch.as_tensor(affine, dtype=torch.float64))
    data = Orientation(axcodes="RAS")(data)
    oriented_affine = data.affine.clone()
    oriented_shape = tuple(int(s) for s in data.shape[1:])
    data = Spacing(pixdim=pixdim, mode="bilinear", dtype=resample_dtype)(data)
    resampled_affine = data.affine.clone()
    data = NormalizeIntensity(nonzero=True)(data)
    data = ScaleIntensity(minv=-1.0, maxv=1.0)(data)
    tensor = data.as_tensor() if isinstance(data, MetaTensor) else torch.as_tensor(data)
    return Preprocessed(
        image=tensor[0].to(torch.float32).contiguous(),
        affine=resampled_affine.to(torch.float64),
        oriented_affine=oriented_affine.to(torch.float64),
        oriented_shape=oriented_shape,  # type: ignore[arg-type]
    )
