"""The bundle's own MONAI pipeline, run in-process: the reference the served labels are compared to.

It follows configs/inference.json of wholeBody_ct_segmentation: LoadImaged, EnsureTyped,
EnsureChannelFirstd, Orientationd(RAS), Spacingd(bilinear), NormalizeIntensityd(nonzero),
ScaleIntensityd(-1, 1), SlidingWindowInferer(96^3, overlap 0.25, gaussian, replicate), softmax,
argmax, Invertd(nearest_interp=True). On the CPU the bundle's `amp=True` has no effect, so this is
the fp32 path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Invertd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    ScaleIntensityd,
    Spacingd,
)

from wholebody.contract import RESOLUTIONS, ROI_SIZE


@dataclass
class ReferenceResult:
    label_map: np.ndarray  # uint8 on the input grid
    seconds: dict[str, float] = field(default_factory=dict)


def reference_segmentation(
    path: Path, network: torch.nn.Module, resolution: str, sw_batch_size: int = 1, amp: bool = False
) -> ReferenceResult:
    """Run the bundle's pipeline on a NIfTI file with `network` (loaded, eval mode, on its device).

    `amp=True` is the bundle's evaluator setting (autocast on CUDA); the default is the fp32 path.
    """
    device = next(network.parameters()).device
    key = "image"
    preprocessing = Compose(
        [
            LoadImaged(keys=key),
            EnsureTyped(keys=key),
            EnsureChannelFirstd(keys=key),
            Orientationd(keys=key, axcodes="RAS"),
            Spacingd(keys=key, pixdim=RESOLUTIONS[resolution].pixdim, mode="bilinear"),
            NormalizeIntensityd(keys=key, nonzero=True),
            ScaleIntensityd(keys=key, minv=-1.0, maxv=1.0),
        ]
    )
    inferer = SlidingWindowInferer(
        roi_size=ROI_SIZE, sw_batch_size=sw_batch_size, overlap=0.25, padding_mode="replicate", mode="gaussian"
    )
    postprocessing = Compose(
        [
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys="pred", argmax=True),
            Invertd(keys="pred", transform=preprocessing, orig_keys=key, nearest_interp=True, to_tensor=True),
        ]
    )
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    data = preprocessing({key: str(path)})
    seconds["pre"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(device.type, enabled=amp and device.type == "cuda"):
        data["pred"] = inferer(data[key][None].to(device), network)[0]
    seconds["inferer"] = time.perf_counter() - start
    start = time.perf_counter()
    data = postprocessing(data)
    seconds["post"] = time.perf_counter() - start
    label_map = data["pred"][0].cpu().numpy().round().astype(np.uint8)
    return ReferenceResult(label_map=label_map, seconds=seconds)
