"""The serving contract: model names, tensor names, resolutions and network variants.

This module is the one place these names are spelled in Python. The `config.pbtxt` files of
`model_repository/` spell them too (Triton needs them there); a test parses every config and checks
it against this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_REPOSITORY = REPO_ROOT / "model_repository"

# --- the public entry point ------------------------------------------------------------------
ENSEMBLE = "wholebody_ct_segmentation"
IMAGE = "image"  # FP32 [-1, -1, -1]: the CT in HU, in the input file's own voxel order
ENSEMBLE_INT16 = "wholebody_ct_segmentation_int16"  # the same, taking IMAGE_INT16 instead of IMAGE
IMAGE_INT16 = "image_int16"  # INT16 [-1, -1, -1]: the CT as stored (int16 HU), ENSEMBLE_INT16's image
AFFINE = "affine"  # FP64 [4, 4]: voxel -> RAS world (mm), as nibabel's `img.affine`
RESOLUTION = "resolution"  # BYTES [1], optional: "highres" or "lowres"
NETWORK = "network"  # BYTES [1], optional: a network variant, e.g. "torch_fp32" or "trt_fp16"
LABEL_MAP = "label_map"  # UINT8 [-1, -1, -1]: labels on the input grid
LABEL_NAMES_PARAMETER = "label_names"  # ensemble config parameter: comma-separated, index = label

# --- the stages --------------------------------------------------------------------------------
PREPROCESS = "preprocess"
SLIDING_WINDOW = "sliding_window"
POSTPROCESS = "postprocess"
NORMALIZED_IMAGE = "normalized_image"  # FP32 [-1,-1,-1]: RAS, resampled, intensity-normalised
RESAMPLED_AFFINE = "resampled_affine"  # FP64 [4, 4]: the affine of NORMALIZED_IMAGE
ORIENTED_AFFINE = "oriented_affine"  # FP64 [4, 4]: IMAGE's grid after Orientation(RAS)
ORIENTED_SHAPE = "oriented_shape"  # INT64 [3]: IMAGE's shape after Orientation(RAS)
RESOLVED_RESOLUTION = "resolved_resolution"  # BYTES [1]: RESOLUTION, or the server's default
RESAMPLED_LABEL_MAP = "resampled_label_map"  # UINT8 [-1,-1,-1], on NORMALIZED_IMAGE's grid

# --- the network models: every variant has the same contract -----------------------------------
WINDOW = "window"  # FP32 [batch, 1, 96, 96, 96]
LOGITS = "logits"  # FP32 [batch, 105, 96, 96, 96]
ROI_SIZE = (96, 96, 96)
NUM_CLASSES = 105
IN_CHANNELS = 1


@dataclass(frozen=True)
class Resolution:
    """One of the bundle's two checkpoints and the voxel spacing it was trained at."""

    name: str
    pixdim: tuple[float, float, float]
    checkpoint: str  # file name under the bundle's models/


RESOLUTIONS: dict[str, Resolution] = {
    "highres": Resolution("highres", (1.5, 1.5, 1.5), "model.pt"),
    "lowres": Resolution("lowres", (3.0, 3.0, 3.0), "model_lowres.pt"),
}

# How a network model computes. torch_* are served by the Python backend from the checkpoint
# (torch_fp16: `.half()` weights, compiled for batches of 8 windows, GPU only; see
# wholebody.torch_network), trt_* are TensorRT plans made by `python -m export`.
TORCH_VARIANTS = ("torch_fp32", "torch_amp", "torch_fp16")
TRT_VARIANTS = ("trt_fp32", "trt_fp16")
VARIANTS = TORCH_VARIANTS + TRT_VARIANTS


def network_model_name(resolution: str, variant: str) -> str:
    """Name of the Triton model serving `variant` of the `resolution` checkpoint.

    >>> network_model_name("highres", "trt_fp16")
    'segresnet_highres_trt_fp16'
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unknown resolution {resolution!r}; choose one of {sorted(RESOLUTIONS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown network variant {variant!r}; choose one of {list(VARIANTS)}")
    return f"segresnet_{resolution}_{variant}"
