"""What the MONAI Label app of slicer/monailabel_app does with a request, without MONAI Label itself: the
models it offers, the structure subset of a request's params, the checks of uploads and image paths, the
bearer token, and the segmentation of one CT through the Triton ensemble with the project's client library.

This module imports no monailabel (it runs in both environments: the MONAI Label server's own virtualenv,
and the project's, where tests/test_monailabel.py unit-tests it). Faults of the caller raise RequestError
with an HTTP status (4xx) and a one-line reason; a server that fails gives 502/503.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.inputs import FORMATS, Header, ScanError
from client.segmentation_client import SegmentationClient, SegmentationError, ServerLimits, write_label_map
from clinical import structures
from clinical.statistics import structure_labels

log = logging.getLogger(__name__)

# model name in MONAI Label -> the ensemble's resolution (wholebody.contract.RESOLUTIONS)
MODELS = {"wholebody_highres": "highres", "wholebody_lowres": "lowres"}
MODEL_DESCRIPTIONS = {
    "wholebody_highres": "104 structures, MONAI wholeBody_ct_segmentation at 1.5 mm (Triton ensemble)",
    "wholebody_lowres": "104 structures, MONAI wholeBody_ct_segmentation at 3.0 mm (Triton ensemble; ~8x faster)",
}
SUBSET_PARAM = "roi_subset"  # params {"roi_subset": ["liver", "spleen"]} or "liver,spleen", as the CLI's --roi-subset
TOKEN_ENV = "WHOLEBODY_MONAILABEL_TOKEN"
HOSTS_ENV = "WHOLEBODY_MONAILABEL_HOSTS"  # comma-separated Host header values accepted (loopback servers)
MAX_BODY_ENV = "WHOLEBODY_MONAILABEL_MAX_BODY_BYTES"
# the largest request body: an uncompressed NIfTI of max_input_voxels float64 voxels (8 bytes, the widest
# NIfTI data type a CT comes in) plus room for its header and the multipart framing
BODY_SLACK_BYTES = 1 << 20
UPLOAD_SUFFIXES = (".nii", ".nii.gz")
_IMAGE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RequestError(Exception):
    """A request the app refuses or could not answer: `status` is the HTTP status, str() the one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def label_dict() -> dict[str, int]:
    """The 104 structure names -> label values of clinical/structures.json (background left out), as MONAI
    Label's /info/ and an infer result's `label_names` carry them."""
    return {s.name: s.label for s in structures.structures() if s.label > 0}


def roi_subset(params: Mapping[str, object]) -> list[int] | None:
    """Label values of the structures named in `params[SUBSET_PARAM]` (a list of names or one comma-separated
    string, case-insensitive); None when absent or empty (all structures).

    Raises RequestError(400) for another type, unknown names (naming the closest valid ones), or a value
    that names nothing (',')."""
    value = params.get(SUBSET_PARAM)
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        names = [n for n in value.split(",") if n.strip()]
    elif isinstance(value, list) and all(isinstance(n, str) for n in value):
        names = [n for item in value for n in item.split(",") if n.strip()]
    else:
        raise RequestError(400, f"params {SUBSET_PARAM!r} must be a list of structure names or a comma-separated "
                                f"string, got {type(value).__name__}")
    try:
        return structure_labels(names, structures.label_names())
    except ValueError as exc:
        raise RequestError(400, f"params {SUBSET_PARAM!r}: {exc}") from None


def keep_only(label_map: np.ndarray, labels: Sequence[int] | None) -> np.ndarray:
    """`label_map` (uint8 [X, Y, Z]) with every label not in `labels` set to 0; unchanged for None."""
    if labels is None:
        return label_map
    lookup = np.zeros(256, dtype=np.uint8)
    lookup[list(labels)] = list(labels)
    return lookup[label_map]


def check_image_id(image_id: str) -> str:
    """An image id for the datastore: letters, digits, '.', '_', '-', not starting with '.' (it names a file in
    the studies folder). Raises RequestError(400) otherwise."""
    if not _IMAGE_ID.fullmatch(image_id) or ".." in image_id:
        raise RequestError(400, f"image id {image_id[:80]!r} must be 1-128 letters, digits, '.', '_' or '-', "
                                "starting with a letter or digit")
    return image_id


def check_session_id(session_id: str) -> str:
    """A session id (MONAI Label makes a UUID; it names a folder in the sessions folder): the plain-id rule of
    `check_image_id`. Raises RequestError(400) otherwise."""
    if not _IMAGE_ID.fullmatch(session_id) or ".." in session_id:
        raise RequestError(400, f"session id {session_id[:80]!r} is not one this server made; create a session "
                                "with PUT /session/ and use the session_id it returns")
    return session_id


def check_label_tag(tag: str) -> str:
    """A label tag of PUT /datastore/label (default "final"; it names a folder in the studies' labels/): the
    plain-id rule of `check_image_id`. Raises RequestError(400) otherwise."""
    if not _IMAGE_ID.fullmatch(tag) or ".." in tag:
        raise RequestError(400, f"label tag {tag[:80]!r} must be 1-128 letters, digits, '.', '_' or '-', starting "
                                "with a letter or digit (e.g. final)")
    return tag


def read_header(path: Path, name: str | None = None) -> Header:
    """The NIfTI header of an uploaded or stored CT; `name` (default: the file's) names it in errors.

    Raises RequestError(400): not a 3-D NIfTI volume, or a header with a dimension below 1 or a NaN or
    singular voxel geometry (the client's own reader, client.inputs.NiftiFormat, checks both)."""
    path = Path(path)
    name = name or path.name
    if path.is_dir() or not path.name.lower().endswith(UPLOAD_SUFFIXES):
        raise RequestError(400, f"{name}: upload one NIfTI CT (.nii or .nii.gz); DICOM series: convert them "
                                "first (e.g. dcm2niix) or use python -m client")
    try:
        header = FORMATS[0].read_header(path)
    except ScanError as exc:
        raise RequestError(400, f"{name}: {exc}") from None
    except (OSError, EOFError, ValueError) as exc:
        raise RequestError(400, f"{name}: not a readable NIfTI file ({exc})") from None
    return header


def check_size(header: Header, limits: ServerLimits, resolution: str | None) -> None:
    """RequestError(413) when the ensemble would refuse a volume of `header`'s size (client.limits())."""
    try:
        limits.check(header, resolution)
    except SegmentationError as exc:  # its fix names the CLI's flag; here the model is the choice
        raise RequestError(413, str(exc).replace("use --resolution lowres", "use the model wholebody_lowres")) from None


def max_body_bytes(limits: ServerLimits) -> int | None:
    """The largest request body to accept for the ensemble's `limits`, or None when it has no voxel limit."""
    if limits.max_input_voxels is None:
        return None
    return limits.max_input_voxels * 8 + BODY_SLACK_BYTES


def inside(path: str | Path, roots: Sequence[str | Path]) -> bool:
    """Whether `path`, links resolved, lies in one of `roots` (links resolved too)."""
    real = Path(os.path.realpath(path))
    return any(real.is_relative_to(os.path.realpath(root)) for root in roots)


def upload_root() -> Path:
    """Where MONAI Label writes a file sent with POST /infer (tempfile.NamedTemporaryFile in its endpoint)."""
    return Path(tempfile.gettempdir())


def check_private_upload_root(root: Path | None = None) -> None:
    """Refuse to serve when the upload folder (`upload_root()`) is writable by other users, as /tmp is.

    An infer request may name an image in that folder (MONAI Label's own POST /infer uploads land there), so
    a shared one would let a token holder segment any NIfTI another user left in /tmp. `python -m
    slicer.serve` points TMPDIR at its private work folder; a `monailabel start_server` run by hand must too.

    Raises RuntimeError (one line naming the fix) for a folder whose mode grants write to others."""
    folder = root if root is not None else upload_root()
    if folder.stat().st_mode & stat.S_IWOTH:
        raise RuntimeError(f"{folder} (the temporary folder, where MONAI Label keeps uploads) is writable by every "
                           "user, so an infer request could name a file another user left there: start the app "
                           "with `python -m slicer.serve`, or set TMPDIR to a folder of its own")


def authorized(header: str | None, token: str) -> bool:
    """Whether an `Authorization` header value is `Bearer <token>` (any letter case of the scheme), compared in
    constant time."""
    if not header:
        return False
    scheme, _, value = header.strip().partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())


@dataclass(frozen=True)
class Segmented:
    """What one infer request produced: the label file (uint8 NIfTI on the input's grid) and the result JSON."""

    label_path: Path
    result: dict


def segment(image: Path, model: str, params: Mapping[str, object], url: str, timeout_s: float | None) -> Segmented:
    """Segment the NIfTI CT `image` with the ensemble's resolution of `model` on the Triton server at `url`
    (gRPC, shared memory when local) and write its label map to a new temporary .nii.gz (the caller removes it).

    The result JSON has `label_names` (name -> value of the structures kept: all 104, or the subset of
    params[SUBSET_PARAM]), `structures_found`, `resolution`, `shape` and `latencies` (seconds).
    Raises RequestError: 404 unknown model or missing image, 400 a bad file or params, 413 over the ensemble's
    limits, 502 a server whose labels differ from clinical/structures.json, 503 Triton unreachable or failing
    (one line each)."""
    if model not in MODELS:
        raise RequestError(404, f"unknown model {model!r}; this server has {', '.join(sorted(MODELS))}")
    resolution = MODELS[model]
    subset = roi_subset(params)
    if not image or not Path(image).is_file():
        raise RequestError(404, f"image {str(image)[:120]!r} not found; upload it first (PUT /datastore/ or /session/)")
    header = read_header(Path(image))
    start = time.monotonic()
    try:
        with SegmentationClient(url, timeout_s=timeout_s) as seg:
            limits = seg.limits()
            check_size(header, limits, resolution)
            if seg.label_names() != structures.label_names():
                raise RequestError(502, f"the Triton server at {url} names its labels differently from "
                                        "clinical/structures.json; serve this project's model repository")
            try:
                volume = FORMATS[0].read_volume(Path(image))
            except ScanError:
                raise
            except (ValueError, EOFError, OSError) as exc:  # voxels the header check could not foresee
                raise RequestError(400, f"{Path(image).name}: not a readable NIfTI CT ({exc}); re-export it") from None
            read_s = time.monotonic() - start
            label_map = seg.segment_volume(volume, resolution=resolution)
    except ScanError as exc:
        raise RequestError(400, f"{Path(image).name}: {exc}") from None
    except SegmentationError as exc:
        raise RequestError(503 if exc.retryable else 422, f"{Path(image).name}: {exc}") from None
    infer_s = time.monotonic() - start - read_s
    label_map = keep_only(label_map, subset)
    fd, name = tempfile.mkstemp(prefix="wholebody_label_", suffix=".nii.gz")
    os.close(fd)
    write_label_map(label_map, volume, Path(name))
    kept = label_dict() if subset is None else {structures.structures()[v].name: v for v in subset}
    found = sorted(int(v) for v in np.unique(label_map) if v)
    result = {
        "label_names": kept,
        "structures_found": len(found),
        "resolution": resolution,
        "shape": list(label_map.shape),
        "latencies": {"read": round(read_s, 3), "triton": round(infer_s, 3),
                      "total": round(time.monotonic() - start, 3)},
    }
    log.info("%s: %s, %d structures found in %.1f s", Path(image).name, model, len(found), time.monotonic() - start)
    return Segmented(Path(name), json.loads(json.dumps(result)))


# Routes of MONAI Label's server that change the server itself or reach beyond it; the Slicer module does not
# need them: uploading or deleting model files (code the server loads), its DICOMweb proxy, its log files,
# reloading the app, deleting studies. (method or "*", path prefix) -> refused with 403.
REFUSED_ROUTES = (
    ("PUT", "/model"), ("DELETE", "/model"), ("POST", "/model"),
    ("*", "/proxy"), ("*", "/logs"), ("*", "/reload"), ("DELETE", "/datastore"),
)


def refused_route(method: str, path: str) -> str | None:
    """The one-line reason a request to `path` with `method` is refused (403), or None when it may pass."""
    clean = "/" + path.strip("/")
    for verb, prefix in REFUSED_ROUTES:
        if (verb == "*" or verb == method.upper()) and (clean == prefix or clean.startswith(prefix + "/")):
            return f"{method.upper()} {prefix}/ is not served here (it would change or reach beyond this server)"
    return None


def body_refusal(method: str, content_length: str | None, chunked: bool, limit: int | None) -> tuple[int, str] | None:
    """(status, reason) when a request body must be refused before it is read: no Content-Length on a chunked
    upload (411) or one above `limit` bytes (413); None when it may be read."""
    if method.upper() not in ("POST", "PUT", "PATCH") or limit is None:
        return None
    if content_length is None:
        return (411, "send a Content-Length with the request body") if chunked else None
    try:
        length = int(content_length)
    except ValueError:
        return 400, f"Content-Length {content_length[:40]!r} is not a number"
    if length > limit:
        return 413, (f"{length:,} bytes is above this server's limit of {limit:,} (the ensemble's max_input_voxels "
                     "as float64 NIfTI); crop the volume")
    return None


def loopback_hosts(port: int, host: str | None = None) -> list[str]:
    """The Host header values a client of a loopback server on `port` sends; with `host` (the address it listens
    on, e.g. 127.0.0.2 or ::1) that one's too, or every request to it would be refused as foreign."""
    hosts = [f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"]
    if host:
        named = f"[{host.strip('[]')}]:{port}" if ":" in host else f"{host.lower()}:{port}"
        hosts += [named] if named not in hosts else []
    return hosts


def browser_refusal(host: str | None, origin: str | None, allowed_hosts: Sequence[str] | None) -> str | None:
    """The one-line reason to refuse (403) a request a web browser may have sent on a web page's behalf, else None.

    3D Slicer and MONAILabelClient send no Origin header; a browser does on cross-site POSTs and on fetches, so
    any Origin is refused (a page the user visits must not upload to, run or read this server). On a loopback
    server (`allowed_hosts` given) the Host header must name it: a DNS-rebinding page sends its own name."""
    if origin:
        return f"requests from web pages (Origin {origin[:80]}) are not served here"
    if allowed_hosts is not None and (host or "").lower() not in allowed_hosts:
        return f"Host {str(host)[:80]!r} is not this server's; connect to {allowed_hosts[0]}"
    return None
