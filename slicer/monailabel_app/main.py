"""MONAI Label app of this project: 3D Slicer's MONAI Label module segments a CT through the Triton ensemble.

Started by MONAI Label's own server (`monailabel start_server --app slicer/monailabel_app ...`), through the
launcher slicer/serve.py, which also locks it (loopback, a token when exposed, body size; docs/slicer.md).
Models: `wholebody_highres` (1.5 mm) and `wholebody_lowres` (3.0 mm), each with the 104 structures of
clinical/structures.json. The infer task sends the volume to the ensemble with the project's client library
(slicer/protocol.py) and returns the label map; nothing runs on torch here.

App configuration (`--conf KEY VALUE` of start_server): `triton_url` (gRPC host:port, default
localhost:8001), `timeout_s` (per request, default 3600).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.utils.sessions import Sessions

from slicer import protocol

log = logging.getLogger(__name__)

DEFAULT_TRITON_URL = "localhost:8001"
DEFAULT_TIMEOUT_S = 3600.0  # a 512x512x397 CT at 1.5 mm on a CPU server takes many minutes


def _http(exc: protocol.RequestError) -> HTTPException:
    return HTTPException(status_code=exc.status, detail=str(exc))


class TritonSegmentation(InferTask):
    """One model of MONAI Label = one resolution of the Triton ensemble; request -> (label file, result JSON).

    Raises HTTPException (FastAPI answers it with its status and a one-line `detail`)."""

    def __init__(self, model: str, url: str, timeout_s: float | None) -> None:
        super().__init__(type=InferType.SEGMENTATION, labels=protocol.label_dict(), dimension=3,
                         description=protocol.MODEL_DESCRIPTIONS[model],
                         config={protocol.SUBSET_PARAM: ""})
        self.model = model
        self.url = url
        self.timeout_s = timeout_s

    def is_valid(self) -> bool:
        return True

    def __call__(self, request: dict[str, Any]) -> tuple[str, dict]:
        try:
            done = protocol.segment(Path(str(request.get("image") or "")), self.model, request, self.url,
                                    self.timeout_s)
        except protocol.RequestError as exc:
            log.warning("%s: %s (%d)", self.model, exc, exc.status)
            raise _http(exc) from None
        return str(done.label_path), done.result


class CheckedDatastore(LocalDatastore):
    """The studies folder; an upload (PUT /datastore/) must be a NIfTI CT under a plain image id."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            if image_id:
                protocol.check_image_id(image_id)
            protocol.read_header(Path(image_filename), f"upload {image_id or ''}".strip())
        except protocol.RequestError as exc:
            # the endpoint removes its temporary copy only after an answer without error
            if protocol.inside(image_filename, [protocol.upload_root()]):
                Path(image_filename).unlink(missing_ok=True)
            raise _http(exc) from None
        return super().add_image(image_id, image_filename, image_info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """PUT /datastore/label (Slicer's *Submit Label*): MONAI Label writes the file to labels/<tag>/<image id>
        <extension of the uploaded name>, so a tag such as ../../x would put any file anywhere: the tag must be
        a plain id and the label a NIfTI file (400 otherwise, the upload removed)."""
        try:
            protocol.check_label_tag(label_tag)
            protocol.read_header(Path(label_filename), f"label for {image_id}")
        except protocol.RequestError as exc:
            if protocol.inside(label_filename, [protocol.upload_root()]):
                Path(label_filename).unlink(missing_ok=True)
            raise _http(exc) from None
        return super().save_label(image_id, label_filename, label_tag, label_info)


class CheckedSessions(Sessions):
    """Sessions (PUT /session/, what the Slicer module uploads a local volume with): one NIfTI CT each."""

    def add_session(self, data_file: str, expiry: int = 0, uncompress: bool = False, session_id: Any = None):
        try:
            if uncompress:
                raise protocol.RequestError(400, "archives are not accepted: upload one NIfTI CT (.nii or .nii.gz)")
            if os.path.isdir(data_file):
                raise protocol.RequestError(400, "several files were uploaded: upload one NIfTI CT (.nii or .nii.gz)")
            protocol.read_header(Path(data_file), "upload")
        except protocol.RequestError as exc:
            shutil.rmtree(os.path.dirname(data_file) if os.path.isfile(data_file) else data_file, ignore_errors=True)
            raise _http(exc) from None
        return super().add_session(data_file, expiry, uncompress, session_id)

    def get_session(self, session_id: str, update_ts: bool = True, fetch_cache: bool = True):
        """A session by id. MONAI Label joins the id to its sessions folder and removes a session whose image is
        gone (rmtree), so an id with path characters (infer's ?session_id=../x) would read, rewrite or delete a
        folder outside it: such ids are refused with 400."""
        self._check(session_id)
        return super().get_session(session_id, update_ts, fetch_cache)

    def remove_session(self, session_id: str) -> None:
        self._check(session_id)
        super().remove_session(session_id)

    @staticmethod
    def _check(session_id: str) -> None:
        try:
            protocol.check_session_id(str(session_id))
        except protocol.RequestError as exc:
            raise _http(exc) from None


class WholebodyApp(MONAILabelApp):
    """The app MONAI Label's server loads from this folder's main.py."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        protocol.check_private_upload_root()
        self.triton_url = conf.get("triton_url", DEFAULT_TRITON_URL)
        self.timeout_s = float(conf.get("timeout_s", DEFAULT_TIMEOUT_S))
        super().__init__(app_dir=app_dir, studies=studies, conf=conf, name="wholebody-ct-triton",
                         description="MONAI wholeBody_ct_segmentation (104 structures) served by Triton",
                         version="0.1.0", labels=protocol.label_dict())

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            raise ValueError(f"{self.studies}: this app serves a local studies folder only (--studies DIR)")
        return CheckedDatastore(self.studies, extensions=["*.nii.gz", "*.nii"],
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def _load_sessions(self, load: bool = False) -> Sessions | None:
        if not load:
            return None
        return CheckedSessions(settings.MONAI_LABEL_SESSION_PATH, settings.MONAI_LABEL_SESSION_EXPIRY)

    def init_infers(self) -> dict[str, InferTask]:
        return {model: TritonSegmentation(model, self.triton_url, self.timeout_s) for model in protocol.MODELS}

    def image_roots(self) -> list[str]:
        """Where an infer request's image may lie: the studies folder, the sessions folder, MONAI Label's uploads."""
        roots = [self.studies, str(protocol.upload_root())]
        if self._sessions is not None:
            roots.append(self._sessions.store_path)
        return roots

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer, with the caller's faults as 4xx: an unknown model (404), and an image path given
        in params that lies outside the studies, sessions and upload folders (403: params override `image`)."""
        model = request.get("model")
        if model not in self._infers:
            raise _http(protocol.RequestError(
                404, f"unknown model {str(model)[:80]!r}; this server has {', '.join(sorted(self._infers))}"))
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise _http(protocol.RequestError(400, "no image: give ?image=<id>, a session_id or a file"))
        if os.path.exists(image) and not protocol.inside(image, self.image_roots()):
            raise _http(protocol.RequestError(403, "the image must be an id of the datastore, a session or an upload"))
        try:
            return super().infer(request, datastore)
        except BaseException:
            # MONAI Label removes a request's uploaded file (POST /infer with a file) only after an answer
            # without error: a refused or failed one would stay in the upload folder
            for key in ("image", "label"):
                upload = request.get(key)
                if isinstance(upload, str) and os.path.isfile(upload) and protocol.inside(upload, [protocol.upload_root()]):
                    Path(upload).unlink(missing_ok=True)
            raise
