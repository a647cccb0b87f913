"""The bundle's SegResNet as ONNX: input `window` [batch,1,96,96,96] -> output `logits` [batch,105,96,96,96], FP32.

Exporter and opset: the TorchScript-based exporter, `torch.onnx.export(..., dynamo=False)`, at opset 17.
Measured on this project's CPU box (torch 2.13, onnx 1.23, onnxruntime 1.32) both exporters give the same
graph and the same numbers (max |logit difference| to PyTorch 4.3e-5 for init_filters=8, identical for both),
and both pass `onnx.checker.check_model(full_check=True)`; the legacy one exports 2x faster (2.9 s vs
6.1 s for init_filters=8, 8 s for the real network) and has no `onnxscript` dependency.
Opset 17 because:

* every op of the graph is native in TensorRT 10's ONNX parser at 17: Conv, InstanceNormalization (GroupNorm
  is exported as Reshape to 8 groups -> InstanceNormalization -> Reshape back -> Mul/Add; TensorRT 10 maps
  InstanceNormalization to its INormalizationLayer, which computes in fp32 even in fp16 engines), Resize
  (linear, half_pixel, scales [1,1,2,2,2] -> IResizeLayer), Relu, Add, Mul, Reshape, Shape;
* no op here gains anything at 18+ (18 adds Resize's antialias/keep_aspect_ratio attributes and
  GroupNormalization, which neither exporter emits for this network), while 17 is also read by the
  TensorRT 8.6 parser and by trtexec of older Triton containers, so one ONNX file serves them all.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from export.common import ExportError, Runner
from wholebody.atomic import atomic_path
from wholebody.contract import IN_CHANNELS, LOGITS, NUM_CLASSES, ROI_SIZE, WINDOW

log = logging.getLogger(__name__)

OPSET = 17
BATCH_AXIS = "batch"

def export_onnx(network: torch.nn.Module, path: Path, opset: int = OPSET) -> Path:
    """Export `network` to ONNX at `path`, check it, and only then move it into place.

    Args:
        network: The bundle's network in eval mode, on the CPU.
        path: Where the `.onnx` file goes; its folder is created.
        opset: ONNX opset (see the module docstring for why 17).

    Returns:
        `path`.

    Raises:
        ExportError: The exported graph fails the ONNX checker or the contract's names and shapes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(1, IN_CHANNELS, *ROI_SIZE)
    with atomic_path(path) as partial:
        with warnings.catch_warnings(), torch.no_grad():
            # the deprecation notice of the TorchScript-based exporter (the choice is deliberate, see above), and
            # the tracer's note on GroupNorm's training-mode size check, a constant for 96^3 windows
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                network,
                (example,),
                str(partial),
                dynamo=False,
                opset_version=opset,
                input_names=[WINDOW],
                output_names=[LOGITS],
                dynamic_axes={WINDOW: {0: BATCH_AXIS}, LOGITS: {0: BATCH_AXIS}},
                do_constant_folding=True,
            )
        check_onnx(partial)
    log.info("wrote %s (%.1f MB, opset %d)", path, path.stat().st_size / 1e6, opset)
    return path


def check_onnx(path: Path) -> None:
    """Run the full ONNX checker and check the graph's inputs and outputs against the contract.

    Raises:
        ExportError: The model is invalid or its I/O is not `window` [batch,1,96,96,96] ->
            `logits` [batch,105,96,96,96], FP32.
    """
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path} fails the ONNX checker: {exc}") from exc
    graph = onnx.load(str(path), load_external_data=False).graph
    expected = {
        WINDOW: [BATCH_AXIS, IN_CHANNELS, *ROI_SIZE],
        LOGITS: [BATCH_AXIS, NUM_CLASSES, *ROI_SIZE],
    }
    found = {}
    for value in [*graph.input, *graph.output]:
        tensor = value.type.tensor_type
        if tensor.elem_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"{path}: {value.name} is {onnx.TensorProto.DataType.Name(tensor.elem_type)}, not FLOAT")
        found[value.name] = [d.dim_param or d.dim_value for d in tensor.shape.dim]
    if found != expected:
        raise ExportError(f"{path}: inputs/outputs {found}, expected {expected}")


def onnx_runner(path: Path) -> Runner:
    """An onnxruntime session on `path` (CUDA provider when onnxruntime has one, else CPU) as a Runner."""
    import onnxruntime

    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in onnxruntime.get_available_providers()]
    session = onnxruntime.InferenceSession(str(path), providers=providers)
    log.info("onnxruntime %s with %s", onnxruntime.__version__, session.get_providers()[0])

    def run(windows: np.ndarray) -> np.ndarray:
        return session.run([LOGITS], {WINDOW: np.ascontiguousarray(windows, dtype=np.float32)})[0]

    return run
