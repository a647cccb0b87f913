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
import mmap
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import nibabel as nib
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc._client import CallContext
from tritonclient.utils import InferenceServerException

from client.inputs import FORMATS, Header, ScanError, Volume, native_array
from client.outputs import label_map_image, write_nifti
from clinical.statistics import voxel_counts
from wholebody.client_regions import PREFIX, region_name, this_process
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
from wholebody.served_models import parameters_of
from wholebody.validation import estimated_resampled_voxels  # the server's own estimate; numpy only, no torch

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
# Triton's gRPC server and this client accept messages up to INT32_MAX bytes; keep room for the rest.
GRPC_MESSAGE_LIMIT = 2**31 - 1 - 2**20
# region names: wholebody_client_<pid>_<start ticks>_<pid namespace>_<n>_in|out (wholebody.client_regions)
SHM_PREFIX = PREFIX
SHM_DIR = Path("/dev/shm")  # where POSIX shared memory lives on Linux (shm_open names)
READY_TIMEOUT_S = 30.0  # the readiness check's bound when no timeout is given
# gRPC status codes after which the same scan may succeed on another server
RETRYABLE_STATUS = ("StatusCode.UNAVAILABLE", "StatusCode.CANCELLED", "StatusCode.UNKNOWN")
CANCELLED = "cancelled: SegmentationClient.abort() was called"
ABORT_UNREGISTER_TIMEOUT_S = 2.0  # the one unregistration try of an aborted request's regions, per region
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


class _Region:
    """One of the client's system shared-memory regions: a new file in /dev/shm (never an existing one,
    its space reserved up front), mapped in this process.

    `unlink` (any thread; idempotent) removes the /dev/shm name; `close` (the thread using the mapping)
    unlinks and drops this object's mapping. Triton maps the file itself at registration, so the name
    is unlinked right after it: from then on nothing of the request is left in /dev/shm whatever
    happens to this process. Arrays from `view` keep the mapping alive after `close` (numpy holds the
    mmap; it is unmapped when the last of them is freed). Raises FileExistsError when a file of that
    name exists, OSError (ENOSPC) when /dev/shm cannot hold `size` bytes.
    """

    def __init__(self, name: str, size: int) -> None:
        self.name = name
        self.size = size  # bytes
        self._path = SHM_DIR / name
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, max(size, 1))  # ENOSPC now, not SIGBUS at the first write
            self._mmap: mmap.mmap | None = mmap.mmap(fd, max(size, 1))
        except BaseException:
            self._path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._unlinked = False
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        """The POSIX shared-memory key Triton opens."""
        return f"/{self.name}"

    def view(self, dtype: np.dtype | type, shape: tuple[int, ...] | list[int]) -> np.ndarray:
        """The region's first prod(shape) elements as a C-order array (no copy; keeps the mapping alive)."""
        assert self._mmap is not None, "region closed"
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._mmap, dtype=dtype, count=count).reshape(shape)

    def write(self, array: np.ndarray) -> None:
        """Copy `array` in, in C order (the region must hold at least its bytes)."""
        self.view(array.dtype, array.shape)[...] = array

    def read(self, dtype: type, shape: list[int]) -> np.ndarray:
        """A Fortran-order copy (what NIfTI writing wants) of the region's first prod(shape) elements."""
        return np.array(self.view(dtype, shape), order="F")

    def unlink(self) -> None:
        """Remove the /dev/shm file (once; later calls do nothing). The mappings stay usable."""
        with self._lock:
            if self._unlinked:
                return
            self._unlinked = True
        try:
            self._path.unlink()
        except FileNotFoundError:
            log.warning("shared-memory file %s was removed by someone else", self.name)

    def close(self) -> None:
        """Unlink, then unmap unless an array from `view` still uses the mapping (then it is unmapped when
        the last such array is freed: an adopted volume, or one held by an exception's traceback)."""
        self.unlink()
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                log.debug("shared-memory region %s is still viewed; unmapped when the view is freed", self.name)
            self._mmap = None


@dataclass
class _Call:
    """The request in flight on a client: its regions, its gRPC call, and the slot its answer lands in."""

    regions: list[_Region] = field(default_factory=list)
    context: CallContext | None = None  # once sent: cancel() ends it
    done: threading.Event = field(default_factory=threading.Event)  # set by the answer, or by abort()
    result: grpcclient.InferResult | None = None
    error: InferenceServerException | None = None


class SegmentationClient:
    """Client of the ensemble on one Triton server (gRPC). One instance per thread: every method
    belongs to the thread that uses the client, except `abort()`, which any thread may call.

    Args:
        url: host:port of the server's gRPC endpoint.
        use_shared_memory: send and receive volumes through system shared memory (only works with
            a server on this host); default: on for localhost/127.0.0.1/::1.
        timeout_s: bound on each request, from connecting to the last byte received; a request that
            runs over raises SegmentationError "timed out after N s".
        release_wait_s: how long `close()` waits for the server to finish requests this client gave
            up on (timeouts, KeyboardInterrupt), so that their shared-memory regions can be
            unregistered; not at all after `abort()`.

    Shared-memory regions are named after this process (wholebody.client_regions): if it dies with a
    request in flight, the launcher's watchdog on the server's host unregisters them and removes their
    /dev/shm files within 2 s of its death, or of the end of the request still using them.
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
        # re-entrant: abort() may run in a signal handler, i.e. in the main thread between two bytecodes
        # of a segment() that holds the lock
        self._lock = threading.RLock()
        self._aborted = threading.Event()
        self._inflight: _Call | None = None  # guarded by _lock

    # --- life cycle -----------------------------------------------------------------------------
    def abort(self) -> None:
        """Cancel this client for good: the request in flight stops at once, and every later one.

        Thread-safe; any thread may call it, any number of times, also a Python signal handler (it
        only takes a re-entrant lock held for microseconds, and never waits for the server). When it
        returns:

        - the /dev/shm files of the request in flight (if any) are unlinked (the memory is freed once
          neither this process nor the server maps it);
        - its gRPC call is cancelled, and the thread waiting in `segment()` (or `segment_volume`,
          `segment_file`) wakes: it raises SegmentationError("cancelled: ...", retryable=False)
          within milliseconds. If that thread is in a short control call instead (registering a region,
          reading the config; bounded by `timeout_s`), or copying the volume into its region (~0.1 s
          per 225 MiB), it raises the same error when that step ends. On its way out it unmaps the
          regions and tries once to unregister them (at most ABORT_UNREGISTER_TIMEOUT_S = 2 s each;
          the server refuses while it still computes the request);
        - `segment()`, `segment_volume()` and `segment_file()` raise that same cancelled error at once;
          `check_ready()`, `label_names()`, `limits()` still work;
        - `close()` does not wait for abandoned requests (`release_wait_s` is ignored): it tries once
          to unregister what is left, then closes the channel. Call it from the thread that owns the
          client, after its `segment()` has raised.

        The cancelled error is not retryable (a retry loop must not send the scan again); `aborted`
        tells it from a failure. The server stops a cancelled scan at its next ensemble step (Triton
        2.51's ensemble does not pass the cancel to the step in flight; a request sent to the
        sliding-window stage itself stops within one batch of windows), and regions it still uses
        stay registered: once this process has exited, the launcher's watchdog
        (`python -m wholebody.triton_server serve`) unregisters them within 2 s of the end of that
        request. A KeyboardInterrupt raised inside `segment()` (SIGINT in the main thread) is not an
        abort: the call is cancelled, the regions are unlinked and unregistration tried once, the
        KeyboardInterrupt goes on, and `close()` then waits up to `release_wait_s` for the server to
        let go; call `abort()` when handling it to exit without waiting.
        """
        with self._lock:
            self._aborted.set()
            call = self._inflight
            regions = list(call.regions) if call is not None else []
            context = call.context if call is not None else None
        for region in regions:
            region.unlink()
        if context is not None:
            context.cancel()
        if call is not None:
            call.done.set()
            log.info("aborted the request in flight to %s", self.url)

    @property
    def aborted(self) -> bool:
        """Whether `abort()` was called."""
        return self._aborted.is_set()

    def _check_aborted(self) -> None:
        if self._aborted.is_set():
            raise SegmentationError(CANCELLED)

    def close(self) -> None:
        """Unregister what the server still holds of abandoned requests (waiting up to release_wait_s;
        after `abort()`, one try without waiting), then close the connection."""
        try:
            if self._pending_release:
                wait_s = 0.0 if self.aborted else self.release_wait_s
                if wait_s:
                    log.info(
                        "waiting up to %.0f s for %s to finish %d abandoned request(s) and release their shared "
                        "memory", wait_s, self.url, len(self._pending_release) // 2 or 1,
                    )
                self.release_pending(wait_s)
                for name in self._pending_release:
                    if self.aborted:
                        log.info(
                            "the server at %s still uses shared-memory region %s; its watchdog unregisters it "
                            "once this process has exited", self.url, name,
                        )
                        continue
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
        return parameters_of(config)

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
            SegmentationError: the server refused the volume, failed, or `timeout_s` ran out; "cancelled"
                (retryable=False) once `abort()` was called, from any thread.
            KeyboardInterrupt: (SIGINT in the main thread) after cancelling the call and unlinking the
                regions (see `abort()`).
        """
        return self._segment([image], affine, resolution, network)

    def _segment(
        self,
        holder: list[np.ndarray],
        affine: np.ndarray,
        resolution: str | None,
        network: str | None,
        adopt: Callable[[np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """`segment` of `holder[0]`. With shared memory, `holder` is emptied as soon as the image is in
        the input region, and `adopt` (if given) receives a C-order view of it there: a caller that
        holds the image nowhere else and adopts the view frees its own copy during the request (the
        client then holds the volume once, not twice)."""
        self._check_aborted()
        deadline = self._deadline()
        self.release_pending(0.0)
        int16 = holder[0].dtype == np.int16 and self.accepts_int16()
        if not int16 and holder[0].dtype != np.float32:
            holder[0] = holder[0].astype(np.float32)
        shape, dtype = tuple(holder[0].shape), holder[0].dtype
        model, name, datatype = (ENSEMBLE_INT16, IMAGE_INT16, "INT16") if int16 else (self.model_name, IMAGE, "FP32")
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        inputs = [grpcclient.InferInput(AFFINE, list(affine.shape), "FP64")]
        inputs[0].set_data_from_numpy(affine)
        for key, value in ((RESOLUTION, resolution), (NETWORK, network)):
            if value:
                tensor = grpcclient.InferInput(key, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
                inputs.append(tensor)
        image_input = grpcclient.InferInput(name, list(shape), datatype)
        inputs.append(image_input)
        output = grpcclient.InferRequestedOutput(LABEL_MAP)
        call = _Call()
        with self._lock:
            self._check_aborted()
            self._inflight = call
        try:
            if self.use_shared_memory:
                return self._infer_shared_memory(
                    call, model, holder, image_input, inputs, output, deadline, shape, dtype, adopt)
            image = holder.pop()
            if image.nbytes > GRPC_MESSAGE_LIMIT:
                raise SegmentationError(
                    f"{image.nbytes / 2**30:.1f} GiB of {datatype} voxels is above gRPC's 2 GiB message limit; "
                    "run the client on the server's host (shared memory, the default for localhost) or crop the image"
                )
            image_input.set_data_from_numpy(np.ascontiguousarray(image))
            self._check_aborted()
            return self._infer(call, model, inputs, output, deadline).as_numpy(LABEL_MAP)
        except InferenceServerException as exc:
            raise self._error(exc) from None
        finally:
            with self._lock:
                self._inflight = None

    def _infer(
        self,
        call: _Call,
        model: str,
        inputs: list[grpcclient.InferInput],
        output: grpcclient.InferRequestedOutput,
        deadline: float | None,
    ) -> grpcclient.InferResult:
        """Send the request and wait for its answer in `call`; `abort()` from any thread ends the wait.

        Raises InferenceServerException (the server's error, or DEADLINE_EXCEEDED at `deadline`),
        SegmentationError (CANCELLED) after `abort()`. An exception raised while waiting
        (KeyboardInterrupt) cancels the call and goes on.
        """

        def answered(result: grpcclient.InferResult | None, error: InferenceServerException | None) -> None:
            call.result, call.error = result, error
            call.done.set()

        self._check_aborted()
        context = self._client.async_infer(
            model, inputs, answered, outputs=[output], client_timeout=self._remaining(deadline)
        )
        call.context = context  # then the check: abort() either sees the context or is seen here
        try:
            if not self._aborted.is_set():
                call.done.wait()
        except BaseException:
            context.cancel()
            raise
        if self._aborted.is_set():
            context.cancel()  # abort() may have run before the call existed
            raise SegmentationError(CANCELLED)
        if call.error is not None:
            raise call.error
        if call.result is None:
            raise SegmentationError(f"the server at {self.url} answered neither a result nor an error")
        return call.result

    def _infer_shared_memory(
        self,
        call: _Call,
        model: str,
        holder: list[np.ndarray],
        image_input: grpcclient.InferInput,
        inputs: list[grpcclient.InferInput],
        output: grpcclient.InferRequestedOutput,
        deadline: float | None,
        image_shape: tuple[int, ...],
        image_dtype: np.dtype,
        adopt: Callable[[np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Send the image (`holder`'s one array, taken out of it once copied) and receive the labels
        through two system shared-memory regions; `adopt` as in `_segment`.

        The client's regions are always destroyed (removed from /dev/shm, unmapped) on the way out.
        If the server still uses them (a request abandoned at its timeout or by a KeyboardInterrupt),
        their registration is kept in `_pending_release` and unregistered once the server has
        finished with them; after `abort()`, unregistration is tried once (the watchdog reclaims the
        rest once this process has exited).
        """
        owner, serial = this_process(), next(_region_ids)
        voxels = int(np.prod(image_shape, dtype=np.int64))
        sizes = {"in": voxels * image_dtype.itemsize, "out": voxels}
        registered: list[str] = []
        answered = False
        try:
            for role, size in sizes.items():
                region = _Region(region_name(owner, serial, role), size)
                with self._lock:
                    call.regions.append(region)
                self._check_aborted()
                self._client.register_system_shared_memory(
                    region.name, region.key, size, client_timeout=self._remaining(deadline)
                )
                registered.append(region.name)
                region.unlink()  # the server has mapped it: no name left behind, whatever happens next
            source, labels = call.regions
            source.write(holder.pop())  # copies into C order
            if adopt is not None:
                adopt(source.view(image_dtype, image_shape))  # the caller may now drop its own copy
            self._check_aborted()
            image_input.set_shared_memory(source.name, source.size)
            output.set_shared_memory(labels.name, labels.size)
            try:
                result = self._infer(call, model, inputs, output, deadline)
            except InferenceServerException as exc:
                # the server answered (an error) unless the client gave up waiting
                answered = exc.status() != "StatusCode.DEADLINE_EXCEEDED"
                raise
            answered = True
            return labels.read(np.uint8, list(result.get_output(LABEL_MAP).shape))
        finally:
            with self._lock:
                regions = list(call.regions)
            for region in regions:
                region.unlink()  # first: nothing of ours stays in /dev/shm, whatever happens next
            aborted = self._aborted.is_set()
            for name in registered:
                if aborted:
                    self._release(name, attempts=1, timeout_s=ABORT_UNREGISTER_TIMEOUT_S)
                else:
                    self._release(name, attempts=20 if answered else 1)
            for region in regions:
                region.close()

    def _release(self, region: str, attempts: int = 20, timeout_s: float = 10.0) -> None:
        """Unregister a region; the server may hold it for a moment after the response arrives.

        If it is still in use after that (an abandoned request), it is released later
        (`release_pending`); if the server is gone, so is its registration. `timeout_s` bounds each try.
        """
        for attempt in range(attempts):
            try:
                self._client.unregister_system_shared_memory(region, client_timeout=timeout_s)
                return
            except InferenceServerException as exc:
                if "in use" not in (exc.message() or ""):
                    if exc.status() not in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED"):
                        log.warning("could not unregister shared-memory region %s: %s", region, exc.message())
                    if exc.status() == "StatusCode.DEADLINE_EXCEEDED":
                        break
                    return
                if attempt + 1 < attempts:
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
        """Labels of a `Volume` (client.inputs), checked against the server's limits first.

        Raises SegmentationError as `segment` does."""
        self._check_aborted()
        self.limits().check(Header(tuple(volume.array.shape), volume.affine), resolution)  # type: ignore[arg-type]
        # with shared memory the volume moves into the request's region (Volume.adopt): held once, not twice
        label_map = self._segment([volume.array], volume.affine, resolution, network, adopt=volume.adopt)
        if label_map.shape != volume.array.shape:
            raise SegmentationError(
                f"server returned labels of shape {list(label_map.shape)} for {list(volume.array.shape)}"
            )
        return label_map

    def segment_file(
        self, input_path: Path, output_path: Path, resolution: str | None = None, network: str | None = None
    ) -> SegmentationResult:
        """Segment a NIfTI CT and write its labels (uint8, the input's affine and header) atomically.

        Raises SegmentationError (its message starts with the input's path) as `segment` does."""
        self._check_aborted()
        input_path, output_path = Path(input_path), Path(output_path)
        volume = _read_volume(input_path, self.limits(), resolution)
        try:
            label_map = self.segment_volume(volume, resolution=resolution, network=network)
        except SegmentationError as exc:
            raise SegmentationError(f"{input_path}: {exc}", exc.retryable) from None
        write_label_map(label_map, volume, output_path)
        return SegmentationResult(input_path, output_path, label_map)
