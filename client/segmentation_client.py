"""A thin gRPC client of the wholebody_ct_segmentation ensemble: a CT in, its labels out.

    from client import SegmentationClient
    with SegmentationClient("localhost:8001") as seg:
        result = seg.segment_file("ct.nii.gz", "ct_seg.nii.gz", resolution="lowres")
        print(result.voxel_counts(seg.label_names()))

Volumes travel through system shared memory when the server is on this host (0.7 s instead of 5-8 s
for a 512x512x400 CT, and no 2 GiB gRPC message limit), inside gRPC messages otherwise; int16 CTs
travel as int16 (to the ensemble's twin `wholebody_ct_segmentation_int16`) where the server has it.
Cohorts: `client.cohort`.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import nibabel as nib
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from client.inputs import FORMATS, Header, ScanError, Volume, native_array
from client.outputs import label_map_image, write_nifti
from clinical.statistics import voxel_counts
from wholebody.contract import (
    AFFINE,
    ENSEMBLE,
    ENSEMBLE_INT16,
    IMAGE,
    IMAGE_INT16,
    LABEL_MAP,
    LABEL_NAMES_PARAMETER,
    NETWORK,
    PREPROCESS,
    RESOLUTION,
    RESOLUTIONS,
)
from wholebody.validation import estimated_resampled_voxels  # the server's own estimate; numpy only, no torch

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
# Triton's gRPC server and this client accept messages up to INT32_MAX bytes; keep room for the rest.
GRPC_MESSAGE_LIMIT = 2**31 - 1 - 2**20
SHM_PREFIX = "wholebody_client"  # region names: wholebody_client_<pid>_<n>_in|out
READY_TIMEOUT_S = 30.0  # the readiness check's bound when no timeout is given
# gRPC status codes after which the same scan may succeed on another server
RETRYABLE_STATUS = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "StatusCode.UNKNOWN")
_region_ids = itertools.count()


class SegmentationError(RuntimeError):
    """A CT could not be segmented; the message says why in one line.

    `retryable` is True when the server (not the scan) failed: unreachable, gone mid-request, or its
    model process died; the same scan may then succeed on another server.
    """

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class ServerLimits:
    """Size limits of the server's preprocessing (voxels), and its default resolution."""

    max_input_voxels: int | None
    max_resampled_voxels: int | None
    default_resolution: str | None

    def check(self, header: Header, resolution: str | None) -> None:
        """Raise SegmentationError if the server would refuse a volume of `header`'s size."""
        voxels = int(np.prod(header.shape))
        if self.max_input_voxels is not None and voxels > self.max_input_voxels:
            raise SegmentationError(
                f"{voxels:,} voxels (shape {list(header.shape)}) is above the server's limit of "
                f"{self.max_input_voxels:,} (max_input_voxels); crop the image or raise the limit"
            )
        resolution = resolution or self.default_resolution
        if self.max_resampled_voxels is not None and resolution in RESOLUTIONS:
            pixdim = RESOLUTIONS[resolution].pixdim
            resampled = estimated_resampled_voxels(header.shape, header.affine, pixdim)
            if resampled > self.max_resampled_voxels:
                fix = ("crop it or raise the server's limit" if pixdim == max(r.pixdim for r in RESOLUTIONS.values())
                       else "use --resolution lowres or crop it")
                raise SegmentationError(
                    f"at {pixdim[0]} mm it would have {resampled:,} voxels, above the server's limit of "
                    f"{self.max_resampled_voxels:,} (max_resampled_voxels); {fix}"
                )


def read_ct(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """Load a NIfTI CT (any letter case, gzip or not), failing with SegmentationError and a one-line
    reason for anything that is not a readable 3-D volume. `ct_array` gives its voxels."""
    return _read_volume(Path(path)).like


def _read_volume(path: Path, limits: ServerLimits | None = None, resolution: str | None = None) -> Volume:
    """The file's Volume; with `limits`, its size is checked from the header before the voxels are read."""
    fmt = next((f for f in FORMATS if f.claims_file(path)), FORMATS[0])
    try:
        if limits is not None:
            limits.check(fmt.read_header(path), resolution)
        return fmt.read_volume(path)
    except (ScanError, SegmentationError) as exc:
        raise SegmentationError(f"{path}: {exc}") from None


def ct_array(image: nib.Nifti1Image) -> np.ndarray:
    """The voxels of a nibabel image as they travel: [X, Y, Z] int16 or float32 HU, C order."""
    return np.ascontiguousarray(native_array(np.asanyarray(image.dataobj)))


def write_label_map(label_map: np.ndarray, like: nib.Nifti1Image | Volume, path: Path) -> None:
    """Write uint8 labels with `like`'s affine and header, atomically (see client.outputs)."""
    write_nifti(label_map_image(label_map, like.like if isinstance(like, Volume) else like), Path(path))


@dataclass
class SegmentationResult:
    input_path: Path
    output_path: Path
    label_map: np.ndarray  # [X, Y, Z] uint8 on the input grid

    def voxel_counts(self, label_names: list[str]) -> dict[str, int]:
        """Voxels per structure present (background left out), in label order."""
        counts = voxel_counts(self.label_map)
        return {label_names[i]: int(counts[i]) for i in range(1, len(counts)) if counts[i] and i < len(label_names)}


class SegmentationClient:
    """Client of the ensemble on one Triton server (gRPC). One instance per thread.

    Args:
        url: host:port of the server's gRPC endpoint.
        use_shared_memory: send and receive volumes through system shared memory (only works with
            a server on this host); default: on for localhost/127.0.0.1/::1.
        timeout_s: bound on each request, from connecting to the last byte received; a request that
            runs over raises SegmentationError "timed out after N s".
        release_wait_s: how long `close()` waits for the server to finish requests this client gave
            up on (timeouts), so that their shared-memory regions can be unregistered.
    """

    def __init__(
        self,
        url: str = "localhost:8001",
        use_shared_memory: bool | None = None,
        timeout_s: float | None = None,
        model_name: str = ENSEMBLE,
        release_wait_s: float = 600.0,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.release_wait_s = release_wait_s
        host = url.rsplit(":", 1)[0]
        self.use_shared_memory = host in LOCAL_HOSTS if use_shared_memory is None else use_shared_memory
        self._client = grpcclient.InferenceServerClient(url)
        self._label_names: list[str] | None = None
        self._limits: ServerLimits | None = None
        self._accepts_int16: bool | None = None
        self._pending_release: list[str] = []  # regions the server still holds for an abandoned request
        self._lock = threading.Lock()

    # --- life cycle -----------------------------------------------------------------------------
    def close(self) -> None:
        """Unregister what the server still holds of abandoned requests (waiting up to release_wait_s)."""
        try:
            if self._pending_release:
                log.info(
                    "waiting up to %.0f s for %s to finish %d abandoned request(s) and release their shared memory",
                    self.release_wait_s, self.url, len(self._pending_release) // 2 or 1,
                )
                self.release_pending(self.release_wait_s)
                for name in self._pending_release:
                    log.warning(
                        "the server at %s still holds shared-memory region %s; it is released when the server "
                        "restarts, or: curl -X POST http://HOST:8000/v2/systemsharedmemory/region/%s/unregister",
                        self.url, name, name,
                    )
        finally:
            self._client.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # --- what the server says about itself --------------------------------------------------------
    def _remaining(self, deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise SegmentationError(f"timed out after {self.timeout_s or READY_TIMEOUT_S:g} s")
        return left

    def _deadline(self) -> float | None:
        return None if self.timeout_s is None else time.monotonic() + self.timeout_s

    def _error(self, exc: InferenceServerException) -> SegmentationError:
        status = exc.status() or ""
        message = re.sub(r"^in ensemble '[^']*', ", "", exc.message() or str(exc))
        if status == "StatusCode.DEADLINE_EXCEEDED":
            return SegmentationError(
                f"timed out after {self.timeout_s:g} s (the server at {self.url} may still be busy)"
            )
        if status in RETRYABLE_STATUS or "stub process" in message.lower():
            return SegmentationError(f"server {self.url} failed: {message}", retryable=True)
        return SegmentationError(message)

    def check_ready(self, deadline: float | None = None) -> None:
        """Raise SegmentationError naming the fix when the server or the ensemble is not there.

        Bounded by `timeout_s` (or `deadline`, a time.monotonic() value), else by READY_TIMEOUT_S: a port
        that accepts connections but never answers is reported, not waited on.
        """
        if deadline is None:
            deadline = time.monotonic() + (self.timeout_s if self.timeout_s is not None else READY_TIMEOUT_S)
        try:
            ready = self._client.is_model_ready(self.model_name, client_timeout=self._remaining(deadline))
        except InferenceServerException as exc:
            reason = "no answer in time" if exc.status() == "StatusCode.DEADLINE_EXCEEDED" else exc.message()
            raise SegmentationError(
                f"no Triton server answers at {self.url} ({reason}); start one with "
                "`python -m wholebody.triton_server serve` or pass -u HOST:PORT",
                retryable=True,
            ) from None
        if not ready:
            raise SegmentationError(f"the server at {self.url} has no ready model {self.model_name!r}", retryable=True)

    def _parameters(self, model: str) -> dict[str, str]:
        try:
            config = self._client.get_model_config(model, client_timeout=self._remaining(self._deadline())).config
        except InferenceServerException as exc:
            raise self._error(exc) from None
        return {key: value.string_value for key, value in config.parameters.items()}

    def label_names(self) -> list[str]:
        """The label names, index = label value, as the server's ensemble config states them."""
        if self._label_names is None:
            value = self._parameters(self.model_name).get(LABEL_NAMES_PARAMETER, "")
            if not value:
                raise SegmentationError(f"{self.model_name} config has no {LABEL_NAMES_PARAMETER} parameter")
            self._label_names = value.split(",")
        return self._label_names

    def limits(self) -> ServerLimits:
        """The server's size limits: the ensemble's config parameters, else the preprocess model's."""
        if self._limits is None:
            ensemble = self._parameters(self.model_name)
            try:
                stage = self._parameters(PREPROCESS)
            except SegmentationError:
                stage = {}

            def number(key: str) -> int | None:
                value = ensemble.get(key) or stage.get(key)
                return int(value) if value else None

            self._limits = ServerLimits(
                max_input_voxels=number("max_input_voxels"),
                max_resampled_voxels=number("max_resampled_voxels"),
                default_resolution=ensemble.get("default_resolution") or stage.get("default_resolution") or None,
            )
        return self._limits

    def accepts_int16(self) -> bool:
        """Whether the server serves the int16 twin of the ensemble (older servers take FP32 only)."""
        if self._accepts_int16 is None:
            if self.model_name != ENSEMBLE:
                self._accepts_int16 = False
            else:
                try:
                    self._accepts_int16 = bool(
                        self._client.is_model_ready(ENSEMBLE_INT16, client_timeout=self._remaining(self._deadline()))
                    )
                except InferenceServerException as exc:
                    raise self._error(exc) from None
        return self._accepts_int16

    # --- segmentation ---------------------------------------------------------------------------
    def segment(
        self, image: np.ndarray, affine: np.ndarray, resolution: str | None = None, network: str | None = None
    ) -> np.ndarray:
        """uint8 labels [X, Y, Z] of a [X, Y, Z] CT in HU on its own grid (any memory layout).

        Args:
            image: the CT as nibabel gives it (`img.dataobj[i, j, k]`), any memory layout. int16 goes
                as int16 to the ensemble's int16 twin where the server has it; any other dtype as float32.
            affine: [4, 4] voxel -> RAS mm (nibabel's `img.affine`).
            resolution: "highres" | "lowres"; None = the server's default.
            network: a network variant (contract.VARIANTS); None = the server's default.
        Raises:
            SegmentationError: the server refused the volume, failed, or `timeout_s` ran out.
        """
        deadline = self._deadline()
        self.release_pending(0.0)
        int16 = image.dtype == np.int16 and self.accepts_int16()
        if not int16 and image.dtype != np.float32:
            image = image.astype(np.float32)
        model, name, datatype = (ENSEMBLE_INT16, IMAGE_INT16, "INT16") if int16 else (self.model_name, IMAGE, "FP32")
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        inputs = [grpcclient.InferInput(AFFINE, list(affine.shape), "FP64")]
        inputs[0].set_data_from_numpy(affine)
        for key, value in ((RESOLUTION, resolution), (NETWORK, network)):
            if value:
                tensor = grpcclient.InferInput(key, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
                inputs.append(tensor)
        image_input = grpcclient.InferInput(name, list(image.shape), datatype)
        inputs.append(image_input)
        output = grpcclient.InferRequestedOutput(LABEL_MAP)
        try:
            if self.use_shared_memory:
                return self._infer_shared_memory(model, image, image_input, inputs, output, deadline)
            if image.nbytes > GRPC_MESSAGE_LIMIT:
                raise SegmentationError(
                    f"{image.nbytes / 2**30:.1f} GiB of {datatype} voxels is above gRPC's 2 GiB message limit; "
                    "run the client on the server's host (shared memory, the default for localhost) or crop the image"
                )
            image_input.set_data_from_numpy(np.ascontiguousarray(image))
            result = self._client.infer(model, inputs, outputs=[output], client_timeout=self._remaining(deadline))
            return result.as_numpy(LABEL_MAP)
        except InferenceServerException as exc:
            raise self._error(exc) from None

    def _infer_shared_memory(
        self,
        model: str,
        image: np.ndarray,
        image_input: grpcclient.InferInput,
        inputs: list[grpcclient.InferInput],
        output: grpcclient.InferRequestedOutput,
        deadline: float | None,
    ) -> np.ndarray:
        """Send the image and receive the labels through two system shared-memory regions.

        The client's regions are always destroyed (unmapped, removed from /dev/shm) on the way out.
        If the server still uses them (a request abandoned at its timeout), their registration is
        kept in `_pending_release` and unregistered once the server has finished with them.
        """
        tag = f"{SHM_PREFIX}_{os.getpid()}_{next(_region_ids)}"
        regions = {"in": (f"{tag}_in", image.nbytes), "out": (f"{tag}_out", int(np.prod(image.shape)))}
        handles: dict[str, shm.SharedMemoryRegion] = {}
        registered: list[str] = []
        answered = False
        try:
            for role, (region, size) in regions.items():
                handles[role] = shm.create_shared_memory_region(region, f"/{region}", size)
                self._client.register_system_shared_memory(
                    region, f"/{region}", size, client_timeout=self._remaining(deadline)
                )
                registered.append(region)
            shm.set_shared_memory_region(handles["in"], [image])  # copies into C order
            image_input.set_shared_memory(*regions["in"])
            output.set_shared_memory(*regions["out"])
            try:
                result = self._client.infer(
                    model, inputs, outputs=[output], client_timeout=self._remaining(deadline)
                )
            except InferenceServerException as exc:
                # the server answered (an error) unless the client gave up waiting
                answered = exc.status() != "StatusCode.DEADLINE_EXCEEDED"
                raise
            answered = True
            shape = result.get_output(LABEL_MAP).shape
            view = shm.get_contents_as_numpy(handles["out"], np.uint8, list(shape))
            labels = np.array(view, order="F")  # the copy NIfTI writing wants (client.outputs)
            del view
            return labels
        finally:
            for region in registered:
                self._release(region, attempts=20 if answered else 1)
            for handle in handles.values():
                shm.destroy_shared_memory_region(handle)

    def _release(self, region: str, attempts: int = 20) -> None:
        """Unregister a region; the server may hold it for a moment after the response arrives.

        If it is still in use after that (an abandoned request), it is released later
        (`release_pending`); if the server is gone, so is its registration.
        """
        for attempt in range(attempts):
            try:
                self._client.unregister_system_shared_memory(region, client_timeout=10.0)
                return
            except InferenceServerException as exc:
                if "in use" not in (exc.message() or ""):
                    if exc.status() not in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"):
                        log.warning("could not unregister shared-memory region %s: %s", region, exc.message())
                    if exc.status() == "StatusCode.DEADLINE_EXCEEDED":
                        break
                    return
                time.sleep(0.01 * (attempt + 1))
        with self._lock:
            self._pending_release.append(region)

    def release_pending(self, wait_s: float) -> None:
        """Try to unregister regions of abandoned requests, for up to `wait_s` seconds."""
        end = time.monotonic() + wait_s
        while True:
            with self._lock:
                pending, self._pending_release = self._pending_release, []
            still = []
            for region in pending:
                try:
                    self._client.unregister_system_shared_memory(region, client_timeout=10.0)
                except InferenceServerException as exc:
                    if "in use" in (exc.message() or "") or exc.status() == "StatusCode.DEADLINE_EXCEEDED":
                        still.append(region)
            with self._lock:
                self._pending_release[:0] = still
            if not still or time.monotonic() >= end:
                return
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def segment_volume(
        self, volume: Volume, resolution: str | None = None, network: str | None = None
    ) -> np.ndarray:
        """Labels of a `Volume` (client.inputs), checked against the server's limits first."""
        self.limits().check(Header(tuple(volume.array.shape), volume.affine), resolution)  # type: ignore[arg-type]
        label_map = self.segment(volume.array, volume.affine, resolution=resolution, network=network)
        if label_map.shape != volume.array.shape:
            raise SegmentationError(
                f"server returned labels of shape {list(label_map.shape)} for {list(volume.array.shape)}"
            )
        return label_map

    def segment_file(
        self, input_path: Path, output_path: Path, resolution: str | None = None, network: str | None = None
    ) -> SegmentationResult:
        """Segment a NIfTI CT and write its labels (uint8, the input's affine and header) atomically."""
        input_path, output_path = Path(input_path), Path(output_path)
        volume = _read_volume(input_path, self.limits(), resolution)
        try:
            label_map = self.segment_volume(volume, resolution=resolution, network=network)
        except SegmentationError as exc:
            raise SegmentationError(f"{input_path}: {exc}", exc.retryable) from None
        write_label_map(label_map, volume, output_path)
        return SegmentationResult(input_path, output_path, label_map)
