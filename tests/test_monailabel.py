"""3D Slicer's path to the Triton ensemble: MONAI Label's real server (monailabel 0.8.5, in its own virtualenv)
with this project's app (slicer/monailabel_app), driven by MONAI Label's own client (`MONAILabelClient`, the
code of Slicer's MONAI Label module) in front of the real tritonserver of the `server` fixture.

The pure logic of slicer/protocol.py is tested here in the project's environment; the client calls run in
MONAI Label's virtualenv (slicer/monailabel_calls.py). The virtualenv is made once (python -m slicer.venv,
`make monailabel`, ~5 min); the end-to-end tests skip, naming the reason, only when it cannot be made
(no PyPI).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

from client.segmentation_client import ServerLimits
from client.inputs import Header
from clinical import structures
from slicer import protocol, serve
from slicer.serve import MonaiLabelServer
from slicer.venv import REPO, VenvMissing, monailabel_python
from wholebody.triton_server import LocalTritonServer

TOKEN = "test-token-Zq4"


# --- slicer/protocol.py: pure logic ----------------------------------------------------------------------
def test_label_dict_is_structures_json() -> None:
    labels = protocol.label_dict()
    assert len(labels) == 104
    assert labels == {name: value for value, name in enumerate(structures.label_names()) if value}


def test_roi_subset_parses_lists_and_strings() -> None:
    liver, spleen = structures.by_name("liver").label, structures.by_name("spleen").label
    assert protocol.roi_subset({}) is None
    assert protocol.roi_subset({"roi_subset": ""}) is None
    assert protocol.roi_subset({"roi_subset": ["Liver", "spleen"]}) == sorted([liver, spleen])
    assert protocol.roi_subset({"roi_subset": "spleen, liver"}) == sorted([liver, spleen])


@pytest.mark.parametrize("value, words", [(["livr"], "closest: liver"), (3, "must be a list"), (["liver", 2], "list"),
                                          (",", "names no structure"), ([" ", ","], "names no structure")])
def test_roi_subset_refuses_with_400(value: object, words: str) -> None:
    with pytest.raises(protocol.RequestError, match=words) as caught:
        protocol.roi_subset({"roi_subset": value})
    assert caught.value.status == 400
    assert "\n" not in str(caught.value)


def test_keep_only() -> None:
    labels = np.array([[[0, 1, 2], [5, 104, 1]]], dtype=np.uint8)
    assert np.array_equal(protocol.keep_only(labels, None), labels)
    assert protocol.keep_only(labels, [1, 104]).tolist() == [[[0, 1, 0], [0, 104, 1]]]
    assert protocol.keep_only(labels, [1]).dtype == np.uint8


@pytest.mark.parametrize("image_id", ["ct1", "case_01.v2", "A-b"])
def test_check_image_id_accepts(image_id: str) -> None:
    assert protocol.check_image_id(image_id) == image_id


@pytest.mark.parametrize("image_id", ["../x", "a/b", ".hidden", "", "a..b", "x" * 129, "a b"])
def test_check_image_id_refuses(image_id: str) -> None:
    with pytest.raises(protocol.RequestError) as caught:
        protocol.check_image_id(image_id)
    assert caught.value.status == 400


@pytest.mark.parametrize("check", [protocol.check_session_id, protocol.check_label_tag])
def test_session_ids_and_label_tags_are_plain_ids(check: object) -> None:
    assert check("56caeb34-f25b-11f1-8573-02fc00000001") and check("final")
    for bad in ("../victim", "/abs", "a/b", "..", ""):
        with pytest.raises(protocol.RequestError) as caught:
            check(bad)  # type: ignore[operator]
        assert caught.value.status == 400


def _patched_nifti(path: Path, offset: int, fmt: str, value: float) -> Path:
    """A NIfTI of 8x8x8 voxels whose header field at `offset` (bytes, little-endian `fmt`) is `value`."""
    raw = bytearray(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)).to_bytes())
    raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("offset, fmt, value, words", [(42, "<h", -5, "dimension below 1"), (42, "<h", 0, "below 1"),
                                                      (280, "<f", float("nan"), "NaN or zero"),
                                                      (280, "<f", 0.0, "NaN or zero")])
def test_read_header_refuses_a_corrupt_geometry(tmp_path: Path, offset: int, fmt: str, value: float, words: str) -> None:
    """dim[1] (offset 42) and srow_x[0] (offset 280) of the NIfTI-1 header: caught at upload, not a 500 in infer."""
    with pytest.raises(protocol.RequestError, match=words) as caught:
        protocol.read_header(_patched_nifti(tmp_path / "ct.nii", offset, fmt, value))
    assert caught.value.status == 400


def test_loopback_hosts_include_the_address_listened_on() -> None:
    assert "127.0.0.2:8010" in protocol.loopback_hosts(8010, "127.0.0.2")
    assert protocol.loopback_hosts(8010, "::1") == protocol.loopback_hosts(8010)


def test_authorized() -> None:
    assert protocol.authorized("Bearer abc", "abc")
    assert protocol.authorized("bearer abc", "abc")  # MONAILabelClient sends the token_type as /auth/token gave it
    assert not protocol.authorized("Bearer abd", "abc")
    assert not protocol.authorized("Basic abc", "abc")
    assert not protocol.authorized(None, "abc")
    assert not protocol.authorized("", "abc")


@pytest.mark.parametrize("method, path, refused", [
    ("GET", "/info/", False), ("PUT", "/datastore/", False), ("PUT", "/session/", False),
    ("POST", "/infer/wholebody_lowres", False), ("GET", "/model/wholebody_lowres", False),
    ("PUT", "/model/wholebody_lowres", True), ("DELETE", "/model/x", True), ("GET", "/proxy/dicom/x", True),
    ("GET", "/logs/", True), ("GET", "/logs", True), ("POST", "/reload", True), ("DELETE", "/datastore/?id=x", True),
    ("GET", "/modelx", False),
])
def test_refused_route(method: str, path: str, refused: bool) -> None:
    assert (protocol.refused_route(method, path.split("?")[0]) is not None) is refused


def test_body_refusal() -> None:
    assert protocol.body_refusal("GET", None, False, 10) is None
    assert protocol.body_refusal("PUT", "10", False, 10) is None
    assert protocol.body_refusal("PUT", "11", False, 10)[0] == 413
    assert protocol.body_refusal("POST", None, True, 10)[0] == 411
    assert protocol.body_refusal("POST", "x", False, 10)[0] == 400
    assert protocol.body_refusal("POST", "11", False, None) is None


def test_max_body_bytes_and_size_check() -> None:
    limits = ServerLimits(max_input_voxels=1000, max_resampled_voxels=None, default_resolution="lowres")
    assert protocol.max_body_bytes(limits) == 1000 * 8 + protocol.BODY_SLACK_BYTES
    assert protocol.max_body_bytes(ServerLimits(None, None, None)) is None
    protocol.check_size(Header((10, 10, 10), np.eye(4)), limits, "lowres")
    with pytest.raises(protocol.RequestError, match="max_input_voxels") as caught:
        protocol.check_size(Header((10, 10, 11), np.eye(4)), limits, "lowres")
    assert caught.value.status == 413


def test_browser_refusal() -> None:
    hosts = protocol.loopback_hosts(8000)
    assert protocol.browser_refusal("127.0.0.1:8000", None, hosts) is None
    assert protocol.browser_refusal("localhost:8000", None, hosts) is None
    assert protocol.browser_refusal("evil.example:8000", None, hosts) is not None  # DNS rebinding
    assert protocol.browser_refusal(None, None, hosts) is not None
    assert protocol.browser_refusal("127.0.0.1:8000", "https://evil.example", hosts) is not None
    assert protocol.browser_refusal("ct-server.example:8000", None, None) is None  # exposed: any name


def test_inside(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("")
    (tmp_path / "link").symlink_to("/etc/hostname")
    assert protocol.inside(tmp_path / "a" / "f", [tmp_path / "a"])
    assert not protocol.inside(tmp_path / "a" / ".." / "link", [tmp_path / "a"])
    assert not protocol.inside(tmp_path / "link", [tmp_path])


def test_a_shared_upload_folder_is_refused(tmp_path: Path) -> None:
    """MONAI Label's uploads land in the temporary folder; one every user can write (/tmp) is refused."""
    shared, private = tmp_path / "shared", tmp_path / "private"
    shared.mkdir()
    private.mkdir(mode=0o755)
    shared.chmod(0o1777)
    with pytest.raises(RuntimeError, match="writable by every user.*python -m slicer.serve"):
        protocol.check_private_upload_root(shared)
    protocol.check_private_upload_root(private)


def test_read_header_refuses_non_nifti(tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_text("not a volume")
    for path in (bad, tmp_path / "ct.nrrd", tmp_path):
        with pytest.raises(protocol.RequestError) as caught:
            protocol.read_header(path)
        assert caught.value.status == 400 and "\n" not in str(caught.value)


def test_serve_refuses_an_exposed_server_without_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(protocol.TOKEN_ENV, raising=False)
    assert serve.main(["--studies", str(tmp_path), "--host", "0.0.0.0", "--dry-run"]) == 2
    empty = tmp_path / "token"
    empty.write_text("\n")
    empty.chmod(0o600)
    assert serve.main(["--studies", str(tmp_path), "--token-file", str(empty), "--dry-run"]) == 2
    shared = tmp_path / "shared-token"
    shared.write_text("abc\n")
    shared.chmod(0o644)  # others could read it and use the server
    with pytest.raises(ValueError, match="chmod 600"):
        serve.read_token(shared)
    shared.chmod(0o600)
    assert serve.read_token(shared) == "abc"
    with pytest.raises(ValueError, match="no such token file"):
        serve.read_token(tmp_path / "missing")
    assert serve.main(["--studies", str(shared), "--dry-run"]) == 2  # a file, not a folder
    assert serve.main(["--studies", str(tmp_path), "--port", "70000", "--dry-run"]) == 2


# --- the real MONAI Label server in front of the real tritonserver ------------------------------------------
@pytest.fixture(scope="module")
def monailabel(server: LocalTritonServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MonaiLabelServer]:
    try:
        monailabel_python()
    except VenvMissing as exc:
        pytest.skip(str(exc))
    base = tmp_path_factory.mktemp("monailabel")
    running = MonaiLabelServer(base / "studies", base / "work", server.grpc_url, token=TOKEN)
    try:
        running.__enter__()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def client_labels(server: LocalTritonServer, example_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The label file of `python -m client` (lowres) for the real abdomen CT on the same server."""
    out = tmp_path_factory.mktemp("client_out")
    done = subprocess.run([sys.executable, "-m", "client", str(example_ct), "-o", str(out), "-u", server.grpc_url,
                           "--resolution", "lowres", "-q"], cwd=REPO, capture_output=True, text=True, timeout=900,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    [label] = list(out.glob("*_seg.nii.gz"))
    return label


def _same_label_file(got: Path, want: Path) -> None:
    a, b = nib.load(got), nib.load(want)
    assert a.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert np.allclose(a.affine, b.affine)


def test_info_lists_both_models_with_their_labels(monailabel: MonaiLabelServer) -> None:
    [info] = monailabel.calls([{"method": "info"}])
    assert info["ok"], info
    models = info["result"]["models"]
    assert set(models) == set(protocol.MODELS)
    for model in protocol.MODELS:
        assert models[model]["labels"] == protocol.label_dict()
        assert models[model]["type"] == "segmentation"
    assert info["result"]["labels"] == protocol.label_dict()


def test_upload_infer_equals_python_m_client(monailabel: MonaiLabelServer, example_ct: Path, client_labels: Path,
                                             tmp_path: Path) -> None:
    upload, infer = monailabel.calls([
        {"method": "upload_image", "file": str(example_ct), "image_id": "example_ct"},
        {"method": "infer", "model": "wholebody_lowres", "image_id": "example_ct", "out": str(tmp_path / "l.nii.gz")},
    ])
    assert upload["ok"] and upload["result"] == {"image": "example_ct"}
    assert infer["ok"], infer
    _same_label_file(tmp_path / "l.nii.gz", client_labels)
    assert infer["result"]["label_names"] == protocol.label_dict()
    assert infer["result"]["resolution"] == "lowres"
    found = np.unique(np.asanyarray(nib.load(client_labels).dataobj))
    assert infer["result"]["structures_found"] == int((found > 0).sum())


def test_session_with_a_structure_subset(monailabel: MonaiLabelServer, example_ct: Path, client_labels: Path,
                                         tmp_path: Path) -> None:
    """What Slicer does with a volume it loaded itself: a session, then infer with params."""
    [session] = monailabel.calls([{"method": "create_session", "file": str(example_ct)}])
    assert session["ok"], session
    subset = ["liver", "spleen", "kidney_left"]
    [infer] = monailabel.calls([{"method": "infer", "model": "wholebody_lowres", "session_id": session["result"]["session_id"],
                                 "params": {"roi_subset": subset}, "out": str(tmp_path / "s.nii.gz")}])
    assert infer["ok"], infer
    keep = [structures.by_name(n).label for n in subset]
    want = protocol.keep_only(np.asanyarray(nib.load(client_labels).dataobj), keep)
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "s.nii.gz").dataobj), want)
    assert infer["result"]["label_names"] == {n: structures.by_name(n).label for n in subset}


def test_callers_faults_are_4xx_and_the_server_keeps_serving(monailabel: MonaiLabelServer, example_ct: Path,
                                                            tmp_path: Path) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    big = tmp_path / "big.nii.gz"  # 8.5 M voxels: above the test server's max_input_voxels (8 M), ~10 kB gzipped
    nib.save(nib.Nifti1Image(np.zeros((256, 256, 130), dtype=np.int16), np.diag([1.0, 1.0, 2.0, 1.0])), big)
    results = monailabel.calls([
        {"method": "upload_image", "file": str(bad), "image_id": "bad"},
        {"method": "create_session", "file": str(bad)},
        {"method": "upload_image", "file": str(example_ct), "image_id": "../escape"},
        {"method": "infer", "model": "no_such_model", "image_id": "example_ct"},
        {"method": "infer", "model": "wholebody_lowres", "image_id": "example_ct", "params": {"roi_subset": ["livr"]}},
        {"method": "infer", "model": "wholebody_lowres", "image_id": "not_uploaded"},
        # the 3 mm CT at 1.5 mm would be ~11 M voxels, above the test server's max_resampled_voxels (10 M)
        {"method": "infer", "model": "wholebody_highres", "image_id": "example_ct"},
        {"method": "upload_image", "file": str(big), "image_id": "big"},
        {"method": "infer", "model": "wholebody_lowres", "image_id": "big"},
        {"method": "infer", "model": "wholebody_lowres", "image_id": "x", "params": {"image": "/etc/hostname"}},
    ])
    statuses = [r.get("status") for r in results]
    assert statuses == [400, 400, 400, 404, 400, 404, 413, None, 413, 403], results
    assert "max_resampled_voxels" in results[6]["error"] and "max_input_voxels" in results[8]["error"]
    assert "closest: liver" in results[4]["error"]
    # a body above the limit is refused from its Content-Length, before it is read
    status, body = monailabel.raw("PUT", "/datastore/?image=huge", {
        "Authorization": f"Bearer {TOKEN}", "Content-Length": str(10**12), "Content-Type": "multipart/form-data"})
    assert status == 413 and "max_input_voxels" in body["detail"]
    # no token, a wrong token, a route that changes the server
    assert monailabel.raw("GET", "/info/")[0] == 401
    assert monailabel.raw("GET", "/info/", {"Authorization": "Bearer wrong"})[0] == 401
    assert monailabel.raw("GET", "/logs/", {"Authorization": f"Bearer {TOKEN}"})[0] == 403
    # what a web page could send: an Origin header; a DNS-rebinding name in Host
    assert monailabel.raw("GET", "/info/", {"Authorization": f"Bearer {TOKEN}", "Origin": "https://x.example"})[0] == 403
    assert monailabel.raw("GET", "/info/", {"Authorization": f"Bearer {TOKEN}", "Host": "x.example"})[0] == 403
    assert monailabel.calls([{"method": "info"}], token="")[0]["status"] == 401
    # still serving, and the refused uploads left no file behind
    [info] = monailabel.calls([{"method": "info"}])
    assert info["ok"]
    assert not [p.name for p in (monailabel.work_dir / "tmp").rglob("*.nii*")]


def test_hostile_ids_headers_and_params_are_4xx_and_leave_nothing_behind(monailabel: MonaiLabelServer,
                                                                         example_ct: Path, tmp_path: Path) -> None:
    """Requests Slicer never sends, sent as raw HTTP: path characters in a session id and a label tag (MONAI Label
    joins both to its folders: the session's would be removed with rmtree, the label written anywhere), a label
    that is no NIfTI, params that are not JSON, a corrupt header, and an uploaded file whose infer fails."""
    url, auth = monailabel.url, {"Authorization": f"Bearer {TOKEN}"}
    victim = monailabel.work_dir / "victim"  # a folder outside the sessions folder that looks like a session
    victim.mkdir()
    (victim / "meta.info").write_text(json.dumps({"name": "v", "path": str(victim), "image": "/gone.nii.gz"}) + "\n")
    answer = requests.post(f"{url}/infer/wholebody_lowres", params={"session_id": "../victim"},
                           data={"params": "{}"}, headers=auth, timeout=60)
    assert answer.status_code == 400 and victim.exists(), answer.text
    with example_ct.open("rb") as ct:
        assert requests.put(f"{url}/datastore/image", params={"image": "hostile"}, files={"file": ("h.nii.gz", ct)},
                            headers=auth, timeout=300).status_code == 200
    for tag, name, data in (("../../escaped", "l.nii.gz", example_ct.read_bytes()), ("final", "x.sh", b"#!/bin/sh\n")):
        answer = requests.put(f"{url}/datastore/label", params={"image": "hostile", "tag": tag},
                              files={"label": (name, data)}, data={"params": "{}"}, headers=auth, timeout=300)
        assert answer.status_code == 400 and "\n" not in answer.json()["detail"], answer.text
    assert not list(monailabel.studies.parent.rglob("escaped*"))
    assert not [p for p in (monailabel.studies / "labels").rglob("*") if p.is_file()]
    answer = requests.post(f"{url}/infer/wholebody_lowres", params={"image": "hostile"}, data={"params": "{oops"},
                           headers=auth, timeout=60)
    assert answer.status_code == 400 and "not JSON" in answer.json()["detail"], answer.text
    answer = requests.post(f"{url}/infer/wholebody_lowres", params={"image": "hostile", "output": "dicom_seg"},
                           data={"params": "{}"}, headers=auth, timeout=60)
    assert answer.status_code == 400 and "dicom-seg" in answer.json()["detail"], answer.text
    corrupt = _patched_nifti(tmp_path / "corrupt.nii", 42, "<h", -5)
    two_d = tmp_path / "two_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), two_d)
    answer = requests.put(f"{url}/session/", files={"files": ("c.nii", corrupt.read_bytes())}, headers=auth, timeout=60)
    assert answer.status_code == 400 and "corrupt header" in answer.json()["detail"], answer.text
    for upload in (corrupt, two_d):  # POST /infer with the file itself: refused, and the upload removed
        answer = requests.post(f"{url}/infer/wholebody_lowres", files={"file": (upload.name, upload.read_bytes())},
                               data={"params": "{}"}, headers=auth, timeout=60)
        assert answer.status_code == 400, answer.text
    assert not [p.name for p in (monailabel.work_dir / "tmp").rglob("*.nii*")]
    assert monailabel.calls([{"method": "info"}])[0]["ok"]


def test_slicer_login_with_the_token_as_password(monailabel: MonaiLabelServer) -> None:
    """Slicer's module asks /auth/ whether auth is on, then POSTs user name and password to /auth/token."""
    status, body = monailabel.raw("GET", "/auth/")
    assert status == 200 and body["enabled"] is True
    [info] = monailabel.calls([{"method": "info"}], token="", login=["radiologist", TOKEN])
    assert info["ok"], info
    with pytest.raises(RuntimeError, match="401"):
        monailabel.calls([], token="", login=["radiologist", "wrong"])
