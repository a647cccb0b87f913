"""The served pipeline in one process: what the ensemble's three stages do, in order.

Used by the parity tests, to tell differences of the pipeline from those of serving; the Triton
stages call the same functions one by one.
"""

from __future__ import annotations

import numpy as np
import torch

from wholebody.contract import RESOLUTIONS, ROI_SIZE
from wholebody.postprocessing import invert_to_input_grid
from wholebody.preprocessing import preprocess
from wholebody.sliding_window import Predictor, sliding_window_label_map


def segment(
    image: torch.Tensor,
    affine: np.ndarray,
    predictor: Predictor,
    resolution: str,
    sw_batch_size: int = 1,
    resample_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """uint8 labels of a [X, Y, Z] CT on its own grid."""
    pre = preprocess(image, affine, RESOLUTIONS[resolution].pixdim, resample_dtype=resample_dtype)
    labels = sliding_window_label_map(pre.image, predictor, ROI_SIZE, sw_batch_size=sw_batch_size)
    return invert_to_input_grid(
        labels, pre.affine.cpu().numpy(), pre.oriented_affine.cpu().numpy(), pre.oriented_shape, affine
    )
