"""A thin gRPC client of the wholebody_ct_segmentation ensemble: a CT in, its labels out.

    from client import SegmentationClient
    with SegmentationClient("localhost:8001") as seg:
        result = seg.segment_file("ct.nii.gz", "ct_seg.nii.gz", resolution="lowres")
        print(result.voxel_counts(seg.label_names()))

Large volumes travel through system shared memory when the server is on this host (0.7 s instead
of 5-8 s for a 512x512x400 CT, and no 2 GiB gRPC message limit), by plain gRPC otherwise.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import nibabel as nib
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from wholebody.contract import AFFINE, ENSEMBLE, IMAGE, LABEL_MAP, LABEL_NAMES_PARAMETER, NETWORK, RESOLUTION

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
_region_ids = itertools.count()


class SegmentationError(RuntimeError):
    """A CT could not be segmented; the message says why in one line."""


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def output_path_for(path: Path, output_dir: Path, suffix: str = "_seg") -> Path:
    """`ct.nii.gz` -> `<output_dir>/ct_seg.nii.gz` (the input's extension is kept)."""
    name = path.name
    ext = next(s for s in sorted(NIFTI_SUFFIXES, key=len, reverse=True) if name.endswith(s))
    return output_dir / f"{name[: -len(ext)]}{suffix}{ext}"


def read_ct(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI CT, failing with a one-line reason for anything that is not a 3-D volume."""
    try:
        image = nib.load(str(path))
    except FileNotFoundError:
        raise SegmentationError(f"{path}: no such file") from None
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise SegmentationError(f"{path}: not a readable NIfTI file ({exc})") from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise SegmentationError(f"{path}: not a NIfTI image ({type(image).__name__})")
    shape = image.shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise SegmentationError(f"{path}: expected a 3-D CT volume, got shape {list(image.shape)}")
    return image


def ct_array(image: nib.Nifti1Image) -> np.ndarray:
    """The voxels as float32 in HU (scaling applied), as MONAI's NIfTI reader gives them."""
    data = np.asanyarray(image.dataobj, order="C")
    data = data.reshape(data.shape[:3]) if data.ndim > 3 else data
    return np.ascontiguousarray(data, dtype=np.float32)


def write_label_map(label_map: np.ndarray, like: nib.Nifti1Image, path: Path) -> None:
    """Write uint8 labels with the input's affine and header, atomically (temp file, then rename)."""
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(label_map.shape)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    header["cal_min"], header["cal_max"] = 0, int(label_map.max(initial=0))
    out = type(like)(label_map.astype(np.uint8, copy=False), like.affine, header)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial" + suffix)
    os.close(fd)
    try:
        nib.save(out, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class SegmentationResult:
    input_path: Path
    output_path: Path
    label_map: np.ndarray

    def voxel_counts(self, label_names: list[str]) -> dict[str, int]:
        """Voxels per structure present (background left out), in label order."""
        counts = np.bincount(self.label_map.reshape(-1), minlength=len(label_names))
        return {label_names[i]: int(counts[i]) for i in range(1, len(counts)) if counts[i] and i < len(label_names)}


class SegmentationClient:
    """Client of the ensemble on a Triton server (gRPC)."""

    def __init__(
        self,
        url: str = "localhost:8001",
        use_shared_memory: bool | None = None,
        timeout_s: float | None = None,
        model_name: str = ENSEMBLE,
    ) -> None:
        self.url = url
        self.model_name = model_name
        self.timeout_s = timeout_s
        host = url.rsplit(":", 1)[0]
        self.use_shared_memory = host in LOCAL_HOSTS if use_shared_memory is None else use_shared_memory
        self._client = grpcclient.InferenceServerClient(url)
        self._label_names: list[str] | None = None

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> SegmentationClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def check_ready(self) -> None:
        """Raise SegmentationError naming the fix when the server or the ensemble is not there."""
        try:
            ready = self._client.is_model_ready(self.model_name)
        except InferenceServerException as exc:
            raise SegmentationError(
                f"no Triton server answers at {self.url} ({exc.message()}); start one with "
                "`python -m wholebody.triton_server serve` or pass -u HOST:PORT"
            ) from None
        if not ready:
            raise SegmentationError(f"the server at {self.url} has no ready model {self.model_name!r}")

    def label_names(self) -> list[str]:
        """The label names, index = label value, as the server's ensemble config states them."""
        if self._label_names is None:
            config = self._client.get_model_config(self.model_name).config
            value = config.parameters[LABEL_NAMES_PARAMETER].string_value
            if not value:
                raise SegmentationError(f"{self.model_name} config has no {LABEL_NAMES_PARAMETER} parameter")
            self._label_names = value.split(",")
        return self._label_names

    def segment(
        self, image: np.ndarray, affine: np.ndarray, resolution: str | None = None, network: str | None = None
    ) -> np.ndarray:
        """uint8 labels of a [X, Y, Z] CT (HU) on its own grid; `affine` maps voxels to RAS mm."""
        image = np.ascontiguousarray(image, dtype=np.float32)
        affine = np.ascontiguousarray(affine, dtype=np.float64)
        inputs = [grpcclient.InferInput(AFFINE, list(affine.shape), "FP64")]
        inputs[0].set_data_from_numpy(affine)
        for name, value in ((RESOLUTION, resolution), (NETWORK, network)):
            if value:
                tensor = grpcclient.InferInput(name, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
                inputs.append(tensor)
        image_input = grpcclient.InferInput(IMAGE, list(image.shape), "FP32")
        inputs.append(image_input)
        output = grpcclient.InferRequestedOutput(LABEL_MAP)
        try:
            if not self.use_shared_memory:
                image_input.set_data_from_numpy(image)
                result = self._client.infer(self.model_name, inputs, outputs=[output], client_timeout=self.timeout_s)
                return result.as_numpy(LABEL_MAP)
            return self._infer_shared_memory(image, image_input, inputs, output)
        except InferenceServerException as exc:
            message = exc.message() or str(exc)
            raise SegmentationError(re.sub(r"^in ensemble '[^']*', ", "", message)) from None

    def _infer_shared_memory(
        self,
        image: np.ndarray,
        image_input: grpcclient.InferInput,
        inputs: list[grpcclient.InferInput],
        output: grpcclient.InferRequestedOutput,
    ) -> np.ndarray:
        """Send the image and receive the labels through system shared memory regions."""
        tag = f"wholebody_{os.getpid()}_{next(_region_ids)}"
        regions = {"in": (f"{tag}_in", image.nbytes), "out": (f"{tag}_out", image.size)}  # uint8 labels
        handles = {}
        try:
            for role, (name, size) in regions.items():
                handles[role] = shm.create_shared_memory_region(name, f"/{name}", size)
                self._client.register_system_shared_memory(name, f"/{name}", size)
            shm.set_shared_memory_region(handles["in"], [image])
            image_input.set_shared_memory(*regions["in"])
            output.set_shared_memory(*regions["out"])
            result = self._client.infer(self.model_name, inputs, outputs=[output], client_timeout=self.timeout_s)
            shape = result.get_output(LABEL_MAP).shape
            return np.array(shm.get_contents_as_numpy(handles["out"], np.uint8, list(shape)))
        finally:
            for role, handle in handles.items():
                try:
                    self._unregister(regions[role][0])
                finally:
                    shm.destroy_shared_memory_region(handle)

    def _unregister(self, name: str, attempts: int = 50) -> None:
        """Unregister a region; the server may hold it for a moment after the response arrives."""
        for attempt in range(attempts):
            try:
                self._client.unregister_system_shared_memory(name)
                return
            except InferenceServerException as exc:
                if "in use" not in (exc.message() or "") or attempt == attempts - 1:
                    raise
                time.sleep(0.02 * (attempt + 1))

    def segment_file(
        self, input_path: Path, output_path: Path, resolution: str | None = None, network: str | None = None
    ) -> SegmentationResult:
        """Segment a NIfTI CT and write its labels (uint8, the input's affine and header) atomically."""
        input_path, output_path = Path(input_path), Path(output_path)
        image = read_ct(input_path)
        label_map = self.segment(ct_array(image), image.affine, resolution=resolution, network=network)
        if label_map.shape != image.shape[:3]:
            raise SegmentationError(f"server returned labels of shape {list(label_map.shape)} for {list(image.shape)}")
        write_label_map(label_map, image, output_path)
        return SegmentationResult(input_path, output_path, label_map)
