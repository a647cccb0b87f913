"""Serialized TensorRT engines (Triton `tensorrt_plan` models) of the network, and a runner to validate them.

Two routes, same engine contract (input `window` FP32 [batch,1,96,96,96], output `logits` FP32
[batch,105,96,96,96], one optimisation profile batch 1 / opt / max, TF32 off, a persisted timing cache, a
workspace limit):

* `onnx`: the exported ONNX file through TensorRT's OnnxParser and `build_serialized_network`; the same
  build as the `trtexec` command that `trtexec_command` prints.
* `torch-tensorrt`: `torch_tensorrt.dynamo.trace` + `convert_exported_program_to_serialized_trt_engine`,
  which returns raw engine bytes (not a TorchScript/ExportedProgram wrapper, which Triton's TensorRT backend
  cannot load). The engine's tensor names must be the contract's: the input is named after the wrapper's
  `forward(window)` argument, the output is `output0` unless the converter accepts `output_binding_names`
  (Torch-TensorRT >= 2.14). With an older Torch-TensorRT this route falls back to `onnx`, with a warning.
  fp16 there is an explicitly typed graph (fp16 weights and activations, GroupNorm in fp32 like PyTorch
  autocast, casts at the ends so the engine's I/O stay fp32) where the converter supports explicit typing
  (>= 2.9; the only mode from 2.13), else `enabled_precisions={torch.float16}`.

`tensorrt` and `torch_tensorrt` are imported inside the functions only: without them everything else in
`export` works, and `tensorrt_unavailable()` says why engines cannot be built here.
"""

from __future__ import annotations

import copy
import inspect
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.common import ExportError, Runner
from wholebody.atomic import atomic_write_bytes
from wholebody.contract import IN_CHANNELS, LOGITS, NUM_CLASSES, ROI_SIZE, WINDOW

log = logging.getLogger(__name__)

VIAS = ("torch-tensorrt", "onnx")
INSTALL_HINT = (
    "install the [tensorrt] extra (pip install '.[tensorrt]': TensorRT 10 and Torch-TensorRT, CUDA builds) "
    "or run inside nvcr.io/nvidia/tritonserver:<yy.mm>-py3 (or nvcr.io/nvidia/pytorch:<yy.mm>-py3 of the "
    "same release) on the GPU kind that will serve: a plan only loads in the TensorRT version that built it"
)


class TensorRTUnavailable(ExportError):
    """TensorRT (or Torch-TensorRT, or a CUDA GPU) is missing here; the message says what to do."""


def import_tensorrt() -> Any:
    """The `tensorrt` module, with a CUDA GPU to build on.

    Raises:
        TensorRTUnavailable: tensorrt does not import or torch sees no CUDA GPU.
    """
    try:
        import tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"tensorrt is not installed: {exc}; {INSTALL_HINT}") from exc
    if not torch.cuda.is_available():
        raise TensorRTUnavailable(f"no CUDA GPU visible to torch {torch.__version__}: TensorRT builds for the GPU "
                                  f"it runs on; {INSTALL_HINT}")
    return tensorrt


def import_torch_tensorrt() -> Any:
    """The `torch_tensorrt` module (after `import_tensorrt`).

    Raises:
        TensorRTUnavailable: tensorrt or torch_tensorrt does not import, or there is no CUDA GPU.
    """
    import_tensorrt()
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise TensorRTUnavailable(f"torch_tensorrt is not installed: {exc}; use --via onnx or {INSTALL_HINT}") from exc
    return torch_tensorrt


def tensorrt_unavailable(via: str) -> str | None:
    """Why engines cannot be built `via` this route here, or None when they can."""
    try:
        if via == "torch-tensorrt":
            import_torch_tensorrt()
        else:
            import_tensorrt()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class EngineSpec:
    """What to build: precision, the batch profile, the workspace limit and the timing cache file."""

    precision: str  # "fp32" | "fp16"
    opt_batch: int
    max_batch: int
    workspace_gib: float
    timing_cache: Path

    def shape(self, batch: int) -> tuple[int, ...]:
        return (batch, IN_CHANNELS, *ROI_SIZE)

    @property
    def profile(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(min, opt, max) shapes of `window`."""
        return self.shape(1), self.shape(self.opt_batch), self.shape(self.max_batch)

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gib * 2**30)


def build_environment() -> dict[str, str]:
    """TensorRT version, GPU name and compute capability of this machine (for config.pbtxt and cache names)."""
    trt = import_tensorrt()
    props = torch.cuda.get_device_properties(0)
    return {
        "tensorrt_version": trt.__version__,
        "gpu": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
    }


def timing_cache_path(artifacts: Path, environment: dict[str, str]) -> Path:
    """Timing cache file for this GPU and TensorRT version (a cache is only valid for both)."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", environment["gpu"]).strip("-").lower()
    sm = environment["compute_capability"].replace(".", "")
    return Path(artifacts) / f"timing_cache_{gpu}_sm{sm}_trt{environment['tensorrt_version']}.bin"


def trtexec_command(onnx_path: Path, plan_path: Path, spec: EngineSpec) -> str:
    """The trtexec command line that builds the same engine as `build_via_onnx`."""
    shapes = {name: f"{WINDOW}:{'x'.join(map(str, shape))}" for name, shape in zip(("min", "opt", "max"), spec.profile)}
    args = [
        "trtexec",
        f"--onnx={onnx_path}",
        f"--minShapes={shapes['min']}",
        f"--optShapes={shapes['opt']}",
        f"--maxShapes={shapes['max']}",
        "--noTF32",
        *(["--fp16"] if spec.precision == "fp16" else []),
        f"--memPoolSize=workspace:{round(spec.workspace_gib * 1024)}M",
        f"--timingCacheFile={spec.timing_cache}",
        f"--saveEngine={plan_path}",
    ]
    return shlex.join(args)


def build_via_onnx(onnx_path: Path, spec: EngineSpec) -> bytes:
    """Parse `onnx_path` with TensorRT's OnnxParser and build a serialized engine for `spec`.

    Raises:
        ExportError: The parser or the builder fails (their messages are included).
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # implicit and deprecated in TensorRT 10
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT {trt.__version__} cannot parse {onnx_path}: {errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, spec.workspace_bytes)
    config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32 (the bundle's trt_fp32 / torch_fp32 definition)
    if spec.precision == "fp16":
        # weakly typed: TensorRT may pick fp16 kernels per layer; normalisation layers compute in fp32 by
        # default, and the network's I/O stay fp32 as declared in the ONNX graph
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(WINDOW, *spec.profile)
    config.add_optimization_profile(profile)
    cache_bytes = spec.timing_cache.read_bytes() if spec.timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("building the %s engine from %s with TensorRT %s", spec.precision, onnx_path, trt.__version__)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT {trt.__version__} failed to build the {spec.precision} engine (see its log above)")
    spec.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(spec.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(serialized))


class WindowModule(torch.nn.Module):
    """`forward(window)`: names the traced input `window`; with `fp16`, casts in and out so I/O stay fp32."""

    def __init__(self, network: torch.nn.Module, fp16: bool = False) -> None:
        super().__init__()
        self.network = network
        self.fp16 = fp16

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        if self.fp16:
            return self.network(window.half()).float()
        return self.network(window)


class Fp32GroupNorm(torch.nn.Module):
    """A GroupNorm computed in fp32 inside an fp16 network, as PyTorch autocast does."""

    def __init__(self, norm: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


def autocast_like_fp16(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of `network` in fp16 whose GroupNorms run in fp32 (autocast's policy, made explicit)."""
    half = copy.deepcopy(network).half()
    for module in list(half.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, Fp32GroupNorm(child))
    return half


def _converter() -> tuple[Any, Any]:
    torch_tensorrt = import_torch_tensorrt()
    return torch_tensorrt, torch_tensorrt.dynamo.convert_exported_program_to_serialized_trt_engine


def torch_tensorrt_names_outputs() -> bool:
    """Whether the installed Torch-TensorRT can name the engine's output `logits` (>= 2.14)."""
    _, convert = _converter()
    return "output_binding_names" in inspect.signature(convert).parameters


def build_via_torch_tensorrt(network: torch.nn.Module, spec: EngineSpec) -> bytes:
    """Trace `network` with Torch-TensorRT's dynamo frontend and convert it to a serialized engine.

    Raises:
        ExportError: Conversion fails.
    """
    torch_tensorrt, convert = _converter()
    params = inspect.signature(convert).parameters
    fp16 = spec.precision == "fp16"
    explicit_typing = "use_explicit_typing" in params or "enabled_precisions" not in params
    settings: dict[str, Any] = {
        "disable_tf32": True,
        "workspace_size": spec.workspace_bytes,
        "timing_cache_path": str(spec.timing_cache),
        "require_full_compilation": True,
        "min_block_size": 1,
        "use_explicit_typing": True,
        "arg_input_binding_names": (WINDOW,),
        "output_binding_names": LOGITS,
    }
    if not explicit_typing:
        settings["enabled_precisions"] = {torch.float16 if fp16 else torch.float32}
    settings = {k: v for k, v in settings.items() if k in params}
    body = autocast_like_fp16(network) if fp16 and explicit_typing else copy.deepcopy(network)
    module = WindowModule(body, fp16=fp16 and explicit_typing).cuda().eval()
    low, opt, high = spec.profile
    window = torch_tensorrt.Input(min_shape=low, opt_shape=opt, max_shape=high, dtype=torch.float32, name=WINDOW)
    spec.timing_cache.parent.mkdir(parents=True, exist_ok=True)
    log.info("building %s engine with Torch-TensorRT %s (%s typing)", spec.precision, torch_tensorrt.__version__,
             "explicit" if explicit_typing else "weak")
    try:
        exported = torch_tensorrt.dynamo.trace(module, arg_inputs=[window])
        return bytes(convert(exported, arg_inputs=[window], **settings))
    except Exception as exc:  # the converter raises many types; name the route and keep the cause
        raise ExportError(f"Torch-TensorRT {torch_tensorrt.__version__} failed to convert: {exc}") from exc
    finally:
        del module
        torch.cuda.empty_cache()


def build_engine(via: str, network: torch.nn.Module, onnx_path: Path, spec: EngineSpec) -> tuple[bytes, str]:
    """Build a serialized engine `via` a route; returns it and the route actually used.

    The `torch-tensorrt` route falls back to `onnx` when Torch-TensorRT cannot name the output `logits`.
    """
    if via == "torch-tensorrt" and not torch_tensorrt_names_outputs():
        log.warning("this Torch-TensorRT names the engine output 'output0', not %r (binding names need >= 2.14): "
                    "building via onnx instead", LOGITS)
        via = "onnx"
    if via == "torch-tensorrt":
        return build_via_torch_tensorrt(network, spec), via
    return build_via_onnx(onnx_path, spec), via


def engine_runner(engine: bytes, spec: EngineSpec) -> Runner:
    """Deserialize `engine`, check its tensors against the contract and `spec`, and return a Runner on it.

    Raises:
        ExportError: The engine does not deserialize, or its I/O names, dtypes, shapes or batch profile differ.
    """
    trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    cuda_engine = runtime.deserialize_cuda_engine(engine)
    if cuda_engine is None:
        raise ExportError("the engine does not deserialize")
    io = {cuda_engine.get_tensor_name(i) for i in range(cuda_engine.num_io_tensors)}
    expected = {
        WINDOW: (trt.TensorIOMode.INPUT, (-1, IN_CHANNELS, *ROI_SIZE)),
        LOGITS: (trt.TensorIOMode.OUTPUT, (-1, NUM_CLASSES, *ROI_SIZE)),
    }
    if io != set(expected):
        raise ExportError(f"engine tensors are {sorted(io)}, the Triton contract needs {sorted(expected)}")
    for name, (mode, shape) in expected.items():
        found = (cuda_engine.get_tensor_mode(name), tuple(cuda_engine.get_tensor_shape(name)),
                 cuda_engine.get_tensor_dtype(name))
        if found != (mode, shape, trt.float32):
            raise ExportError(f"engine tensor {name} is {found}, expected {(mode, shape, trt.float32)}")
    profile = tuple(tuple(s) for s in cuda_engine.get_tensor_profile_shape(WINDOW, 0))
    if profile != spec.profile:
        raise ExportError(f"engine profile of {WINDOW} is {profile}, expected {spec.profile}")
    context = cuda_engine.create_execution_context()

    def run(windows: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.float32)).cuda()
        out = torch.empty((x.shape[0], NUM_CLASSES, *ROI_SIZE), dtype=torch.float32, device="cuda")
        context.set_input_shape(WINDOW, tuple(x.shape))
        context.set_tensor_address(WINDOW, x.data_ptr())
        context.set_tensor_address(LOGITS, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not context.execute_async_v3(stream.cuda_stream):
            raise ExportError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()

    run.engine = cuda_engine  # type: ignore[attr-defined]  # keep the engine alive as long as the context
    return run
