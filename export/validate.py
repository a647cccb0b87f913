"""Validate an exported network (ONNX or a TensorRT plan) against the PyTorch fp32 network.

The same windows go through both: random ones (standard normal, the input of the bundle's own TensorRT
benchmark) and ones cut from a real CT, so that the labels and per-class Dice are those of anatomy, not
noise. Metrics:

* max abs error: max |candidate - reference| over all logits;
* max rel error: that divided by max |reference| (relative to the logit scale: an element-wise relative
  error is meaningless for logits that cross zero);
* label agreement: fraction of voxels whose argmax over the 105 classes is the same (all windows, and the
  CT windows alone);
* Dice per class between the two label maps of the CT windows; the gate is the smallest Dice over classes
  with at least MIN_DICE_VOXELS reference voxels (a structure of a few voxels has a Dice decided by one
  boundary voxel).

A candidate passes when it meets every bound of its Tolerance and all its logits are finite.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from export.common import ExportError, Runner
from wholebody.contract import IN_CHANNELS, NUM_CLASSES, ROI_SIZE

log = logging.getLogger(__name__)

MIN_DICE_VOXELS = 1000  # 27 mL at 3 mm, 3.4 mL at 1.5 mm


@dataclass(frozen=True)
class Tolerance:
    """The bounds a candidate must meet against PyTorch fp32."""

    max_rel_error: float  # max |candidate - reference| / max |reference|
    min_label_agreement: float  # fraction of voxels, all windows
    min_dice: float  # smallest per-class Dice on the CT windows, classes with >= MIN_DICE_VOXELS voxels

    def __str__(self) -> str:
        return (f"max rel error <= {self.max_rel_error:g}, label agreement >= {self.min_label_agreement:.1%}, "
                f"min Dice >= {self.min_dice:g}")


TOLERANCES: dict[str, Tolerance] = {
    # fp32 (onnxruntime; TensorRT with TF32 off): the same arithmetic as PyTorch, only kernels and summation
    # order differ. Measured for onnxruntime on the CPU (random weights): max abs error 2.0e-4 = 2.6e-5 of the
    # logit scale (init_filters=8) and 9.6e-4 = 2.7e-4 of it (the real network, CT window: GroupNorm over
    # near-uniform air divides by a tiny variance and amplifies rounding); label agreement 99.998 % and
    # 99.98 %, the rest near-tied classes of random weights flipping on the last bits. The logit bound
    # (~40x the worst measured) and the label bounds (>= 5x) leave room for other fp32 kernels (TensorRT's
    # tactics) and still fail any real fault: a wrong op or layout changes logits by O(1) and most labels.
    "fp32": Tolerance(max_rel_error=1e-2, min_label_agreement=0.999, min_dice=0.99),
    # fp16: 10-bit mantissa (rounding 4.9e-4 per op) through ~20 convolutions with residual adds; argmax flips
    # where the top-2 margin is below the error. Measured for PyTorch's fp16 network with fp32 GroupNorm (what
    # the Torch-TensorRT route builds; autocast's policy) against fp32, real architecture with random weights,
    # one CT and one random window, CPU: max error 2.0e-3 of the logit scale, label agreement 99.82 %, min
    # Dice 0.995 (on the H100, fp16 blending agreed on 99.76 %: shared/facts/measurements.md). Real weights
    # have larger class margins, so fewer flips. 99 % agreement (5x the measured disagreement) and Dice
    # >= 0.95 per sizeable structure accept that and reject overflow, a normalisation in fp16 that shifts
    # whole regions, or NaNs. The logit bound (50x the measured) only guards against gross breakage.
    "fp16": Tolerance(max_rel_error=1e-1, min_label_agreement=0.99, min_dice=0.95),
}


@dataclass(frozen=True)
class Windows:
    """Validation windows [n,1,96,96,96] float32, and where each came from."""

    data: np.ndarray
    sources: tuple[str, ...]

    @property
    def is_ct(self) -> np.ndarray:
        return np.array([not s.startswith("random") for s in self.sources])


def validation_windows(count: int, ct_path: Path, seed: int = 0) -> Windows:
    """`ceil(count/2)` windows cut from the CT at `ct_path`, the rest standard-normal noise.

    The CT is preprocessed crudely (HU clipped to [-1024, 1024] and scaled to [-1, 1], no resampling or
    reorientation): the point is anatomy-like input, not the bundle's exact preprocessing. Windows are
    spread along the volume's diagonal; the volume is edge-padded to at least 96 voxels per axis.
    """
    if count < 1:
        raise ValueError("need at least one validation window")
    n_ct = (count + 1) // 2
    volume = np.asarray(nib.load(str(ct_path)).dataobj, dtype=np.float32)
    volume = np.clip(volume, -1024.0, 1024.0) / 1024.0
    volume = np.pad(volume, [(0, max(0, r - s)) for s, r in zip(volume.shape, ROI_SIZE)], mode="edge")
    windows, sources = [], []
    for i in range(n_ct):
        t = 0.5 if n_ct == 1 else i / (n_ct - 1)
        start = [round(t * (s - r)) for s, r in zip(volume.shape, ROI_SIZE)]
        crop = tuple(slice(b, b + r) for b, r in zip(start, ROI_SIZE))
        windows.append(volume[crop])
        sources.append(f"{Path(ct_path).name}@{','.join(map(str, start))}")
    rng = np.random.default_rng(seed)
    for i in range(count - n_ct):
        windows.append(rng.standard_normal(ROI_SIZE, dtype=np.float32))
        sources.append(f"random#{i}")
    data = np.stack(windows)[:, None].astype(np.float32)
    assert data.shape[1:] == (IN_CHANNELS, *ROI_SIZE)
    return Windows(np.ascontiguousarray(data), tuple(sources))


@contextlib.contextmanager
def _tf32_off() -> Iterator[None]:
    """Full fp32 on CUDA (the bundle's `torch_fp32` definition), restoring the global flags afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class Reference:
    """PyTorch fp32 logits [n,105,96,96,96] and argmax labels [n,96,96,96] of the validation windows."""

    windows: Windows
    logits: np.ndarray
    labels: np.ndarray


def compute_reference(network: torch.nn.Module, windows: Windows, batch_size: int) -> Reference:
    """Run the fp32 network (on CUDA with TF32 off when there is a GPU, else on the CPU) on `windows`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net = copy.deepcopy(network).to(device).eval()
    outputs = []
    with torch.inference_mode(), _tf32_off():
        for start in range(0, len(windows.data), batch_size):
            batch = torch.from_numpy(windows.data[start : start + batch_size]).to(device)
            outputs.append(net(batch).float().cpu().numpy())
    logits = np.concatenate(outputs)
    log.info("PyTorch fp32 reference on %s: %d windows", device, len(logits))
    return Reference(windows, logits, logits.argmax(1).astype(np.uint8))


@dataclass
class Report:
    """How a candidate compares with the reference, and whether it passes its Tolerance."""

    name: str
    precision: str
    tolerance: Tolerance
    windows: list[str]
    max_abs_error: float = math.nan
    max_rel_error: float = math.nan
    label_agreement: float = math.nan
    ct_label_agreement: float = math.nan
    min_dice: float = math.nan  # nan: no class reached MIN_DICE_VOXELS
    mean_dice: float = math.nan
    dice: dict[int, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "passed": self.passed, "min_dice_voxels": MIN_DICE_VOXELS}


def compare(name: str, precision: str, candidate: Runner, reference: Reference, batch_size: int) -> Report:
    """Run `candidate` on the reference windows in batches and measure it against the reference.

    Args:
        name: What is compared, for the table (e.g. "lowres onnx", "segresnet_lowres_trt_fp16").
        precision: "fp32" or "fp16": picks the Tolerance.
        candidate: Maps windows [b,1,96,96,96] to logits [b,105,96,96,96].
        reference: The PyTorch fp32 result on the same windows.
        batch_size: Windows per candidate call (> 1 exercises a dynamic batch axis).

    Raises:
        ExportError: The candidate returns the wrong shape.
    """
    windows = reference.windows
    report = Report(name, precision, TOLERANCES[precision], list(windows.sources))
    ref_count = np.zeros(NUM_CLASSES, np.int64)
    cand_count = np.zeros(NUM_CLASSES, np.int64)
    intersection = np.zeros(NUM_CLASSES, np.int64)
    agree = agree_ct = voxels_ct = 0
    max_abs_error = 0.0
    finite = True
    for start in range(0, len(windows.data), batch_size):
        out = candidate(windows.data[start : start + batch_size])
        expected = (min(batch_size, len(windows.data) - start), NUM_CLASSES, *ROI_SIZE)
        if tuple(out.shape) != expected:
            raise ExportError(f"{name} returned logits of shape {tuple(out.shape)}, expected {expected}")
        for offset, logits in enumerate(out):
            i = start + offset
            finite &= bool(np.isfinite(logits).all())
            max_abs_error = max(max_abs_error, float(np.abs(logits - reference.logits[i]).max()))
            labels = logits.argmax(0).astype(np.uint8)
            same = labels == reference.labels[i]
            agree += int(same.sum())
            if windows.is_ct[i]:
                agree_ct += int(same.sum())
                voxels_ct += same.size
                ref_count += np.bincount(reference.labels[i].ravel(), minlength=NUM_CLASSES)
                cand_count += np.bincount(labels.ravel(), minlength=NUM_CLASSES)
                intersection += np.bincount(labels[same].ravel(), minlength=NUM_CLASSES)
    report.max_abs_error = max_abs_error
    report.max_rel_error = max_abs_error / max(float(reference.logits.max()), -float(reference.logits.min()), 1e-12)
    report.label_agreement = agree / reference.labels.size
    report.ct_label_agreement = agree_ct / voxels_ct if voxels_ct else math.nan
    present = np.flatnonzero(ref_count + cand_count)
    report.dice = {int(c): float(2 * intersection[c] / (ref_count[c] + cand_count[c])) for c in present}
    if present.size:
        report.mean_dice = float(np.mean(list(report.dice.values())))
    sizeable = [report.dice[int(c)] for c in np.flatnonzero(ref_count >= MIN_DICE_VOXELS)]
    if sizeable:
        report.min_dice = min(sizeable)

    tol = report.tolerance
    if not finite:
        report.failures.append("non-finite logits")
    if not report.max_rel_error <= tol.max_rel_error:
        report.failures.append(f"max rel error {report.max_rel_error:.2e} > {tol.max_rel_error:.0e}")
    if not report.label_agreement >= tol.min_label_agreement:
        report.failures.append(f"label agreement {report.label_agreement:.4%} < {tol.min_label_agreement:.1%}")
    if sizeable and not report.min_dice >= tol.min_dice:
        report.failures.append(f"min Dice {report.min_dice:.4f} < {tol.min_dice}")
    level = logging.INFO if report.passed else logging.ERROR
    log.log(level, "%s: %s", name, "passed" if report.passed else "FAILED: " + "; ".join(report.failures))
    return report


def format_table(reports: list[Report]) -> str:
    """The reports as a fixed-width text table, one row each."""
    header = ("candidate", "prec", "max abs err", "max rel err", "labels agree", "CT agree", "min Dice", "mean Dice",
              "result")
    rows = [header] + [
        (
            r.name,
            r.precision,
            f"{r.max_abs_error:.3e}",
            f"{r.max_rel_error:.2e}",
            f"{r.label_agreement:.4%}",
            f"{r.ct_label_agreement:.4%}",
            f"{r.min_dice:.4f}",
            f"{r.mean_dice:.4f}",
            "ok" if r.passed else "FAILED",
        )
        for r in reports
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
