"""The router (issue 18 item 1): rules, backoff and the state store alone; then the whole flow with real
parts: dcmtk's storescu pushes a real CT (as a DICOM series) to a real Orthanc, the router (a real
`python -m router run` process) segments it through the session's real Triton, the SEG appears in that
Orthanc referencing the study and arrives by C-STORE at a second Orthanc acting as the PACS; a router
killed with SIGKILL mid-series and started again makes the series' results exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from clinical.quality import CHECKS
from router.orthanc import Modality, OrthancClient, OrthancError, OrthancNode, free_port
from router.rules import Rules, RulesError, SeriesFacts, decide, load_rules, rules_from_mapping, tilt_deg
from router.service import is_permanent, status_table
from router.state import NewSeries, StateStore, backoff_s
from wholebody.contract import REPO_ROOT

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CT = SeriesFacts(modality="CT", description="CT abdomen", slice_thickness_mm=3.0, slices=112, orientation=AXIAL)


# --- rules (pure) -------------------------------------------------------------------------------------


def test_default_rules_take_an_axial_ct() -> None:
    assert decide(Rules(), CT).accepted


@pytest.mark.parametrize(("change", "reason"), [
    ({"modality": "SEG"}, "modality SEG"),
    ({"modality": "MR"}, "modality MR"),
    ({"slices": 5}, "5 slices < min_slices 20"),
    ({"slice_thickness_mm": 8.0}, "slice thickness 8 mm outside"),
    ({"slice_thickness_mm": None}, "no SliceThickness"),
    ({"description": "Topogram 0.6 T20f"}, "description_exclude"),
    ({"description": "Patient Protocol DOSE"}, "description_exclude"),
    ({"orientation": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)}, "not axial"),  # sagittal
    ({"orientation": None}, "no ImageOrientationPatient"),
    ({"orientation": (float("nan"),) * 6}, "ImageOrientationPatient is not finite"),  # "NaN" parses as float
    ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "LOCALIZER"),
])
def test_default_rules_refuse_and_say_why(change: dict[str, object], reason: str) -> None:
    facts = SeriesFacts(**{**CT.__dict__, **change})
    decision = decide(Rules(), facts)
    assert not decision.accepted and reason in decision.reason


def test_site_rules_body_part_and_description_patterns() -> None:
    rules = rules_from_mapping({"body_parts": ["abdomen", "chest"], "description_include": ["(?i)abd|thorax"],
                                "description_exclude": [], "slice_thickness_mm": None, "min_slices": 50})
    assert decide(rules, SeriesFacts(**{**CT.__dict__, "body_part": "ABDOMEN"})).accepted
    assert "body part HEAD" in decide(rules, SeriesFacts(**{**CT.__dict__, "body_part": "HEAD"})).reason
    other = SeriesFacts(**{**CT.__dict__, "body_part": "CHEST", "description": "Lung 1mm"})
    assert "no description_include" in decide(rules, other).reason
    assert decide(rules, SeriesFacts(**{**CT.__dict__, "body_part": "CHEST", "slice_thickness_mm": None})).accepted
    tilted = (1.0, 0.0, 0.0, 0.0, float(np.cos(np.radians(20))), float(np.sin(np.radians(20))))
    assert round(tilt_deg(tilted)) == 20
    assert "not axial" in decide(Rules(), SeriesFacts(**{**CT.__dict__, "orientation": tilted})).reason
    no_orientation = SeriesFacts(**{**CT.__dict__, "orientation": None})
    assert decide(rules_from_mapping({"orientation": "any"}), no_orientation).accepted


def test_rules_files_yaml_and_json(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text("modalities: [CT]\nslice_thickness_mm: [1, 3]\nmin_slices: 100\n")
    assert load_rules(tmp_path / "rules.yaml") == Rules(slice_thickness_mm=(1.0, 3.0), min_slices=100)
    (tmp_path / "rules.json").write_text(json.dumps({"description_exclude": ["(?i)bone"]}))
    assert load_rules(tmp_path / "rules.json").description_exclude == ("(?i)bone",)
    assert load_rules(None) == Rules()
    (tmp_path / "empty.yaml").write_text("")
    assert load_rules(tmp_path / "empty.yaml") == Rules()


@pytest.mark.parametrize(("content", "message"), [
    ('{"modality": ["CT"]}', "unknown key(s) modality"),
    ('{"description_include": ["(unclosed"]}', "not a regular expression"),
    ('{"slice_thickness_mm": [5, 1]}', "[min, max]"),
    ('{"min_slices": 0}', "positive integer"),
    ('{"min_slices": true}', "positive integer"),  # a bool is a Python int: true must not mean 1 slice
    ('{"max_tilt_deg": true}', "number of degrees"),
    ('{"slice_thickness_mm": [false, 5]}', "[min, max]"),
    ('{"orientation": "coronal"}', "'axial' or 'any'"),
    ("[1, 2]", "must be a mapping"),
    ("{", "not valid JSON"),
])
def test_bad_rules_files_are_named_with_the_fix(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "rules.json"
    path.write_text(content)
    with pytest.raises(RulesError, match=r"rules\.json") as raised:
        load_rules(path)
    assert message in str(raised.value)
    with pytest.raises(RulesError, match="cannot read"):
        load_rules(tmp_path / "missing.json")
    (tmp_path / "latin1.yaml").write_bytes("min_slices: 3  # caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RulesError, match=r"latin1\.yaml: not UTF-8 text"):
        load_rules(tmp_path / "latin1.yaml")


# --- retries and the state store ----------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(a, 30, 900) for a in range(1, 8)] == [30, 60, 120, 240, 480, 900, 900]
    assert backoff_s(10_000, 1, 5) == 5  # no overflow
    with pytest.raises(ValueError):
        backoff_s(0, 30, 900)


def test_permanent_errors_fail_at_once_and_server_errors_are_retried() -> None:
    from client.segmentation_client import SegmentationError
    from clinical.dicom_series import DicomInputError

    assert is_permanent(DicomInputError("x: uneven slices"))
    assert is_permanent(SegmentationError("volume too large"))
    assert not is_permanent(SegmentationError("server down", retryable=True))
    assert not is_permanent(SegmentationError("timed out after 60 s"))
    assert not is_permanent(ConnectionError("refused"))


def test_state_records_series_with_the_feed_position_once(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s.sqlite") as store:
        assert store.last_seq() == 0
        page = [NewSeries("a", "1.2.1", "1.2", True, "ok"), NewSeries("b", "1.2.2", "1.2", False, "modality SEG")]
        assert store.record_changes(page, 10, now=100.0) == 2
        assert store.record_changes([NewSeries("a", "1.2.1", "1.2", True, "ok")], 12, now=101.0) == 0  # seen
        assert store.last_seq() == 12
        assert store.counts()["queued"] == 1 and store.counts()["ignored"] == 1
        # "b" stable again with the rest of its slices (a slow sender): the rules take it now, so it is queued
        assert not store.known("b") and store.known("a")
        assert store.record_changes([NewSeries("b", "1.2.2", "1.2", True, "ok")], 12, now=102.0) == 1
        assert store.counts()["queued"] == 2 and store.counts()["ignored"] == 0
        assert store.record_changes([NewSeries("b", "1.2.2", "1.2", True, "ok")], 12, now=103.0) == 0  # once
        # a page whose recording fails leaves neither its rows nor its position
        with pytest.raises(sqlite3.Error):
            unbindable = NewSeries("d", object(), "", True, "")  # type: ignore[arg-type]
            store.record_changes([NewSeries("c", "", "", True, "ok"), unbindable], 20)
        assert store.last_seq() == 12 and not store.known("c")


def test_state_claims_retries_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with StateStore(path) as store:
        store.record_changes([NewSeries("a", "1", "9", True, "ok"), NewSeries("b", "2", "9", True, "ok")], 5, now=1.0)
        first = store.claim("w0", now=10.0)
        assert first is not None and first.orthanc_id == "a" and first.attempts == 1 and first.status == "running"
        store.retry_later("a", "attempt 1: server down", delay_s=1000.0)
        second = store.claim("w1")
        assert second is not None and second.orthanc_id == "b"
        assert store.claim("w2") is None  # a is not due yet, b is running
        store.finish("b", "done", "1 result(s) stored", ["1.2.3"], {"segment_s": 1.5})
        done = store.rows("done")[0]
        assert done.results == ["1.2.3"] and done.stages == {"segment_s": 1.5}
        assert "next try in" in status_table(store.rows(), now=time.time())
    with StateStore(path) as store:  # a router that died with a series running
        store._db.execute("UPDATE series SET status = 'running', next_try = 0 WHERE orthanc_id = 'a'")
        assert store.recover() == 1
        again = store.claim("w0")
        assert again is not None and again.orthanc_id == "a" and again.attempts == 2
        store.finish("a", "failed", "gave up")
        assert store.requeue("a") and not store.requeue("nope")
        assert store.rows("queued")[0].attempts == 0


# --- the whole flow, real parts -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct_folders(example_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three DICOM series of one study: the real abdomen CT twice (two series UIDs) and a 5-slice crop."""
    from clinical.dicom_series import write_ct_series

    image = nib.load(example_ct)
    volume = np.asarray(image.dataobj, dtype=np.int16)
    root = tmp_path_factory.mktemp("router-ct")
    study = pydicom.uid.generate_uid()
    out = {}
    for name, vol, description in (("first", volume, "CT abdomen"), ("second", volume, "CT abdomen again"),
                                    ("crop", volume[:, :, 50:55], "CT crop")):
        write_ct_series(vol, image.affine, root / name, study_uid=study, series_description=description,
                        patient_id="ROUTER")
        out[name] = root / name
    return out


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[tuple[OrthancNode, OrthancNode]]:
    """The router's Orthanc (receives from storescu, forwards to 'pacs') and a second Orthanc as the PACS."""
    router_dicom = free_port()
    with OrthancNode(name="pacs", aet="PACS", storage=tmp_path / "pacs" / "storage",
                     senders={"router": Modality("WHOLEBODY", "127.0.0.1", router_dicom)}) as pacs, \
         OrthancNode(dicom_port=router_dicom, stable_age_s=2, storage=tmp_path / "node" / "storage",
                     pacs={"pacs": Modality("PACS", "127.0.0.1", pacs.dicom_port)}) as node:
        yield node, pacs


def storescu(node: OrthancNode, folder: Path, aet: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["storescu", "-aet", aet, "-aec", node.aet, "127.0.0.1", str(node.dicom_port), "+sd",
                           str(folder)], capture_output=True, text=True, timeout=120, check=False)


class RouterProcess:
    """`python -m router run` as a real process in its own group."""

    def __init__(self, node: OrthancNode, triton_url: str, state_dir: Path, log: Path) -> None:
        self.args = [sys.executable, "-m", "router", "run", "--orthanc", node.url, "-u", triton_url,
                     "--pacs", "pacs", "--state-dir", str(state_dir), "--resolution", "lowres",
                     "--poll-seconds", "0.2", "--backoff-seconds", "1", "--timeout", "600",
                     # random test weights trip the checks; that a failed "hold" check keeps a result from the
                     # PACS is tested on constructed labels (test_results_hold_a_result_whose_sides_are_swapped)
                     "--quality-policy", ",".join(f"{check}=report" for check in CHECKS)]
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(self.args, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return int(self.process.returncode)


def wait_for(what: str, check: object, timeout_s: float, log: Path | None = None) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()  # type: ignore[operator]
        if value:
            return value
        time.sleep(0.1)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise AssertionError(f"{what} not within {timeout_s} s\n{tail}")


def rows(state_dir: Path) -> dict[str, dict[str, object]]:
    path = state_dir / "router.sqlite"
    if not path.exists():
        return {}
    with StateStore(path) as store:
        return {r.series_uid: r.as_dict() for r in store.rows()}


def segs(client: OrthancClient, study_uid: str, modality: str = "SEG") -> list[dict[str, object]]:
    """The SEG (or `modality`) instances Orthanc holds in the study (their tags)."""
    found = client._call("POST", "/tools/find", json={"Level": "Instance", "Expand": True, "Query": {
        "StudyInstanceUID": study_uid, "Modality": modality}}).json()
    return [client.get_json(f"/instances/{i['ID']}/simplified-tags") for i in found]


def series_uid_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def test_pushed_ct_is_segmented_stored_and_forwarded_once_across_a_kill(
        server: object, nodes: tuple[OrthancNode, OrthancNode], ct_folders: dict[str, Path], tmp_path: Path) -> None:
    node, pacs = nodes
    state_dir, log = tmp_path / "state", tmp_path / "router.log"
    router = RouterProcess(node, server.grpc_url, state_dir, log)  # type: ignore[attr-defined]
    router.start()
    try:
        first, crop = series_uid_of(ct_folders["first"]), series_uid_of(ct_folders["crop"])
        for name in ("first", "crop"):
            sent = storescu(node, ct_folders[name])
            assert sent.returncode == 0, sent.stderr
        wait_for("the first series done", lambda: rows(state_dir).get(first, {}).get("status") in ("done", "failed"),
                 300, log)
        state = rows(state_dir)
        assert state[first]["status"] == "done", state[first]
        wait_for("the crop recorded", lambda: crop in rows(state_dir), 30, log)
        assert rows(state_dir)[crop]["status"] == "ignored" and "5 slices" in str(rows(state_dir)[crop]["message"])

        node_client, pacs_client = OrthancClient(node.url), OrthancClient(pacs.url)
        study = str(pydicom.dcmread(next(ct_folders["first"].iterdir()), stop_before_pixels=True).StudyInstanceUID)
        (seg,) = segs(node_client, study)
        assert seg["SOPInstanceUID"] == state[first]["results"][0]  # type: ignore[index]
        assert seg["StudyInstanceUID"] == study
        referenced = seg["ReferencedSeriesSequence"][0]["SeriesInstanceUID"]  # type: ignore[index]
        assert referenced == first
        (arrived,) = segs(pacs_client, study)
        assert arrived["SOPInstanceUID"] == seg["SOPInstanceUID"]
        # the TID 1500 SR referencing that SEG is stored and forwarded with it; the quality report is kept
        (sr,) = segs(node_client, study, "SR")
        assert sr["SOPInstanceUID"] == state[first]["results"][1]  # type: ignore[index]
        assert [s["SOPInstanceUID"] for s in segs(pacs_client, study, "SR")] == [sr["SOPInstanceUID"]]
        quality = json.loads((state_dir / "quality" / f"{first}.json").read_text())
        assert quality["held"] is False and set(quality["policy"].values()) == {"report"}
        # the operator's views: Orthanc metadata, status.json, the status table; the study is kept
        series_id = str(state[first]["orthanc_id"])
        assert node_client._call("GET", f"/series/{series_id}/metadata/WholebodyRouterStatus").text == "done"
        status = json.loads((state_dir / "status.json").read_text())
        assert status["counts"]["done"] == 1 and status["counts"]["ignored"] >= 1
        table = subprocess.run([sys.executable, "-m", "router", "status", "--state-dir", str(state_dir)],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
        assert first in table and "done" in table
        assert len(node_client.get_json(f"/series/{series_id}")["Instances"]) == 112
        # the router's own SEG and SR series came back through the feed and were ignored by the rules
        wait_for("the SEG and SR series recorded",
                 lambda: sum(r["status"] == "ignored" for r in rows(state_dir).values()) == 3, 30, log)

        # SIGKILL mid-series, then start again: the series is made once (same SOP Instance UID if redone)
        second = series_uid_of(ct_folders["second"])
        assert storescu(node, ct_folders["second"]).returncode == 0
        wait_for("the second series running", lambda: rows(state_dir).get(second, {}).get("status") == "running",
                 60, log)
        router.kill()
        assert rows(state_dir)[second]["status"] == "running"
        router.start()
        wait_for("the second series done after the restart",
                 lambda: rows(state_dir).get(second, {}).get("status") in ("done", "failed"), 300, log)
        after = rows(state_dir)[second]
        assert after["status"] == "done" and after["attempts"] == 2, after
        assert "queued again" in log.read_text()
        assert list((state_dir / "work").iterdir()) == []  # the killed router's download was cleared
        made = [s for s in segs(node_client, study)
                if s["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == second]  # type: ignore[index]
        assert len(made) == 1
        forwarded = [s for s in segs(pacs_client, study)
                     if s["ReferencedSeriesSequence"][0]["SeriesInstanceUID"] == second]  # type: ignore[index]
        assert len(forwarded) == 1
        assert len(segs(pacs_client, study)) == 2  # and nothing else was sent
        assert len(segs(node_client, study, "SR")) == len(segs(pacs_client, study, "SR")) == 2
        assert router.stop() == 0
    finally:
        if router.process is not None and router.process.poll() is None:
            router.kill()
    shutil.rmtree(state_dir, ignore_errors=True)


# --- the cluster (issue 18 item 5): rendered by kubectl kustomize, validated offline ----------------------


def test_router_component_renders_and_validates() -> None:
    import kubernetes_validate
    import yaml

    from tests.test_deploy import KUBERNETES, KUBERNETES_VERSION, one, render

    objects = render(KUBERNETES / "router-example")
    for obj in objects:
        assert obj["metadata"]["namespace"] == "wholebody"
        if obj["apiVersion"].startswith(("keda.sh", "monitoring.coreos.com")):
            continue  # the server's CRD objects: tests/test_deploy.py validates them
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    router = one(objects, "Deployment", "wholebody-router")
    assert router["spec"]["replicas"] == 1 and router["spec"]["strategy"]["type"] == "Recreate"  # one SQLite writer
    (container,) = router["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[0] == "run"
    assert args[args.index("--url") + 1] == "wholebody-triton:8001"  # the server's Service, kube-proxy spreads
    triton_service = one(objects, "Service", "wholebody-triton")
    assert 8001 in [p["port"] for p in triton_service["spec"]["ports"]]
    assert args[args.index("--orthanc") + 1] == "http://wholebody-orthanc:8042"
    orthanc_service = one(objects, "Service", "wholebody-orthanc")
    assert {p["name"]: p["port"] for p in orthanc_service["spec"]["ports"]} == {"http": 8042, "dicom": 4242}
    assert container["image"] == "registry.example.org/wholebody-ct-router:0.1.0"
    # the rules come from the ConfigMap, and the router can read them
    rules_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(
        "wholebody-router-rules"))
    volumes = {v["name"]: v for v in router["spec"]["template"]["spec"]["volumes"]}
    assert volumes["rules"]["configMap"]["name"] == rules_map["metadata"]["name"]
    assert rules_from_mapping(yaml.safe_load(rules_map["data"]["rules.yaml"])) == Rules()  # documented = default
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == "wholebody-router-state"
    one(objects, "PersistentVolumeClaim", "wholebody-router-state")
    # Orthanc (optional component): a StatefulSet with storage per pod and the config the router relies on
    orthanc = one(objects, "StatefulSet", "wholebody-orthanc")
    assert orthanc["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "storage"
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(
        "wholebody-orthanc-config"))
    config = json.loads(config_map["data"]["orthanc.json"])
    assert config["DicomModalities"]["pacs"] and config["UserMetadata"] == {"WholebodyRouterStatus": 4242}
    assert config["AuthenticationEnabled"] and "router" in config["RegisteredUsers"]
    # the server's NetworkPolicy admits clients from their namespace; the router's own one opens gRPC to it
    opened = one(objects, "NetworkPolicy", "wholebody-triton-from-router")
    assert opened["spec"]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "wholebody-triton"}
    assert opened["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "wholebody-router"}
    triton_pods = one(objects, "Deployment", "wholebody-triton")["spec"]["template"]["metadata"]["labels"]
    assert triton_pods["app.kubernetes.io/name"] == "wholebody-triton"
    # the router's pods keep their own name label (the base's labels are not applied to the component)
    assert router["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "wholebody-router"


def test_router_cli_rejects_bad_input_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "rules.json").write_text('{"min_slices": -1}')
    result = subprocess.run([sys.executable, "-m", "router", "run", "--rules", str(tmp_path / "rules.json"),
                             "--state-dir", str(tmp_path / "s")], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2 and "rules.json: min_slices must be a positive integer" in result.stderr
    result = subprocess.run([sys.executable, "-m", "router", "status", "--state-dir", str(tmp_path / "none")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "no router state here" in result.stderr
    result = subprocess.run([sys.executable, "-m", "router", "retry", "abc", "--state-dir", str(tmp_path / "typo")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "no router state here" in result.stderr
    assert not (tmp_path / "typo").exists()  # a mistyped --state-dir gets no fresh, empty state
    (tmp_path / "afile").write_text("")
    result = subprocess.run([sys.executable, "-m", "router", "run", "--state-dir", str(tmp_path / "afile"),
                             "--orthanc", "http://127.0.0.1:9"], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "afile: File exists; give a writable --state-dir" in result.stderr
    for flag, value in (("--backoff-seconds", "-1"), ("--backoff-cap-seconds", "-5"), ("--poll-seconds", "0")):
        result = subprocess.run([sys.executable, "-m", "router", "run", flag, value, "--state-dir", str(tmp_path / "s"),
                                 "--orthanc", "http://127.0.0.1:9"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 2 and "must be >= 0 and --poll-seconds > 0" in result.stderr, flag


def test_stack_prints_its_addresses_and_ctrl_c_stops_everything(server: object, tmp_path: Path) -> None:
    """`python -m router stack` with the session's Triton (-u): Orthanc and the router come up on loopback,
    SIGINT stops them all (the process group is empty after), Orthanc's storage is kept."""
    import requests

    from viewer import study_url
    from wholebody.triton_server.processes import process_group

    process = subprocess.Popen(
        [sys.executable, "-m", "router", "stack", "-u", server.grpc_url,  # type: ignore[attr-defined]
         "--dicom-port", "0", "--http-port", "0", "--state-dir", str(tmp_path / "stack"), "--stable-age", "2"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        addresses = {k.strip(): v.strip() for k, _, v in (line.partition("  ") for line in lines) if v}
        rest = addresses["Orthanc REST"]
        assert rest.startswith("http://127.0.0.1:"), lines
        assert requests.get(f"{rest}/system", timeout=10).json()["DicomAet"] == "WHOLEBODY"
        assert addresses["DICOM (C-STORE here)"].startswith("WHOLEBODY@127.0.0.1:")
        assert addresses["Triton gRPC"] == server.grpc_url  # type: ignore[attr-defined]
        # the OHIF viewer (viewer/, `make viewer` builds it) on Orthanc's own origin, beside DICOMweb
        assert addresses["viewer"].startswith(f"{rest}/viewer/")
        page = requests.get(study_url(rest, "1.2.3"), timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=60) == 0
        assert process_group(process.pid) == []
        with pytest.raises(requests.ConnectionError):
            requests.get(f"{rest}/system", timeout=5)
        assert (tmp_path / "stack" / "orthanc").is_dir() and (tmp_path / "stack" / "router.sqlite").exists()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_status_endpoint_and_file_show_each_series(tmp_path: Path) -> None:
    """GET /status and /healthz on loopback, and status.json, from a router whose state holds two series
    (no Orthanc answers: the feed's error is logged and the router keeps running)."""
    import requests

    from router.service import Router, RouterConfig

    with StateStore(tmp_path / "router.sqlite") as store:
        store.record_changes([NewSeries("a", "1.2.1", "1.2", False, "modality SEG not in CT")], 3)
    router = Router(RouterConfig(orthanc_url=f"http://127.0.0.1:{free_port()}", triton_urls=["127.0.0.1:1"],
                                 state_dir=tmp_path, status_port=0, poll_s=0.2))
    router.start()
    try:
        base = f"http://127.0.0.1:{router.status_port}"
        assert requests.get(f"{base}/healthz", timeout=10).json() == {"healthy": True}
        status = requests.get(f"{base}/status", timeout=10).json()
        assert status["counts"]["ignored"] == 1 and status["series"][0]["message"] == "modality SEG not in CT"
        assert requests.get(f"{base}/other", timeout=10).status_code == 404
        assert json.loads((tmp_path / "status.json").read_text())["counts"]["ignored"] == 1
    finally:
        router.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/healthz", timeout=5)


def test_results_made_again_keep_their_uids(tmp_path: Path) -> None:
    """The hook's SEG of one series made twice (a redo after a crash) has the same Series and SOP Instance
    UIDs, so Orthanc and the PACS store it once; another seed (another model version) gives new ones."""
    from clinical.dicom_series import read_ct_series, write_ct_series
    from router.results import results_for

    volume = np.full((24, 20, 6), -1000, dtype=np.int16)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[4:12, 4:12, 1:5] = 5
    write_ct_series(volume, np.diag([2.0, 2.0, 3.0, 1.0]), tmp_path / "ct")
    (series,) = read_ct_series(tmp_path / "ct")

    def uids(folder: str, seed: str) -> tuple[str, ...]:
        (tmp_path / folder).mkdir()
        seg, sr = results_for(series, labels, tmp_path / folder, uid_seed=seed).files
        ds = pydicom.dcmread(seg, stop_before_pixels=True)
        report = pydicom.dcmread(sr)
        assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY" and report.Modality == "SR"
        return (str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(report.SeriesInstanceUID),
                str(report.SOPInstanceUID))

    first = uids("a", f"{series.series_uid}|0.2.5|lowres")
    assert uids("b", f"{series.series_uid}|0.2.5|lowres") == first
    other = uids("c", f"{series.series_uid}|0.2.6|lowres")
    assert all(a != b for a, b in zip(other, first))


@pytest.mark.parametrize("swapped", [False, True])
def test_results_hold_a_result_whose_sides_are_swapped(tmp_path: Path, swapped: bool) -> None:
    """The hook runs the quality checks under the site's policy: kidneys on the wrong sides (laterality, "hold"
    by default) make a hold reason naming them, and the result is still written (stored for review); on their
    own sides nothing is held. The SR carries the checks (clinical.structured_report reads them back)."""
    from clinical.dicom_series import read_ct_series, write_ct_series
    from clinical.structured_report import read_measurement_report
    from router.results import results_for

    volume = np.full((24, 20, 6), -1000, dtype=np.int16)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    left, right = slice(2, 6), slice(16, 20)  # a diagonal affine: +x (RAS) points to the patient's right
    labels[left if swapped else right, 6:12, 1:5] = 2  # kidney_right
    labels[right if swapped else left, 6:12, 1:5] = 3  # kidney_left
    write_ct_series(volume, np.diag([2.0, 2.0, 3.0, 1.0]), tmp_path / "ct")
    (series,) = read_ct_series(tmp_path / "ct")
    made = results_for(series, labels, tmp_path, uid_seed="seed")
    assert made.quality is not None and len(made.files) == 2
    if swapped:
        assert made.hold is not None and "laterality (kidney_left)" in made.hold and "kidney_right" in made.hold
    else:
        assert made.hold is None, made.quality.to_dict()
    structures, scan = read_measurement_report(made.files[1])
    assert set(structures) == {"kidney_right", "kidney_left"} and scan["held"] is swapped


def test_a_read_on_a_connection_orthanc_dropped_is_tried_once_more() -> None:
    """An idle keep-alive connection closed by the server as the next changes-feed poll reuses it is not an
    error (seen as false 'is Orthanc running there?' ERRORs of an idle stack); a POST is never resent."""
    import http.server
    import threading

    calls = {"GET": 0, "POST": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _drop_first(self, method: str) -> bool:
            calls[method] += 1
            if calls[method] == 1:
                self.connection.close()  # no response at all: "Connection aborted"
                return True
            return False

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if not self._drop_first("GET"):
                body = b'{"Changes": [], "Last": 5, "Done": true}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            self._drop_first("POST")

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = OrthancClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=10)
        assert client.changes(0) == ([], 5, True) and calls["GET"] == 2
        with pytest.raises(OrthancError, match="is Orthanc running there"):
            client._call("POST", "/instances", data=b"x")
        assert calls["POST"] == 1
    finally:
        server.shutdown()
        server.server_close()


# --- download, retry by prefix, the stack's checks up front ---------------------------------------------


def test_a_series_is_fetched_instance_by_instance_in_parallel(tmp_path: Path) -> None:
    """A real Orthanc holding a small CT series: `download_instances` (4 workers) writes one file per
    instance, nothing half-written, and the series read from them is the volume that was stored."""
    from clinical.dicom_series import read_ct_series, write_ct_series

    volume = np.random.default_rng(0).integers(-1000, 2000, size=(32, 28, 24), dtype=np.int16)
    write_ct_series(volume, np.diag([0.8, 0.8, 2.0, 1.0]), tmp_path / "ct", series_description="download")
    with OrthancNode(storage=tmp_path / "orthanc" / "storage") as pacs:
        client = OrthancClient(pacs.url)
        answers = [client.store_instance(path) for path in sorted((tmp_path / "ct").iterdir())]
        (series_id,) = {a["ParentSeries"] for a in answers}
        (tmp_path / "got").mkdir()
        files = client.download_instances(series_id, tmp_path / "got", workers=4)
        assert sorted(p.name for p in files) == sorted(f"{a['ID']}.dcm" for a in answers)
        assert sorted(p.name for p in (tmp_path / "got").iterdir()) == sorted(p.name for p in files)  # no partials
        (series,) = read_ct_series(tmp_path / "got")
        (original,) = read_ct_series(tmp_path / "ct")
        np.testing.assert_array_equal(series.volume, original.volume)
        with pytest.raises(OrthancError, match="HTTP 404"):
            client.download_instances("no-such-series", tmp_path / "got")
        client.close()


def test_a_failed_instance_fetch_is_tried_again_then_fails_the_series(tmp_path: Path) -> None:
    """A body cut short and a 503 are tried again (GET is idempotent); an instance that keeps failing, or a 404,
    fails the download with one line naming it; no temporary file is left behind either way; files that do not
    match the series' list of instances one for one fail it too. (A small HTTP server stands in for Orthanc's
    failures, which a healthy Orthanc does not make on demand.)"""
    import http.server
    import threading

    calls: dict[str, int] = {}
    encodings: set[str] = set()  # of the instance fetches: not compressed (Orthanc would deflate each file)
    broken = {"i3"}  # answers 503 every time

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            calls[self.path] = calls.get(self.path, 0) + 1
            encodings.add(self.headers.get("Accept-Encoding", "") if "/file" in self.path else "identity")
            if self.path.startswith("/series/"):
                listed = {"/series/S": ["i1", "i2", "i3"], "/series/S2": ["i1", "gone"]}.get(self.path, ["i1", "i1"])
                return self._send(200, json.dumps({"Instances": listed}).encode())
            instance = self.path.split("/")[2]
            if instance == "gone":
                return self._send(404, b"unknown resource")
            if instance in broken:
                return self._send(503, b"busy")
            if instance == "i2" and calls[self.path] == 1:  # the first answer is cut off mid-body
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"partial")
                self.wfile.flush()
                self.connection.close()
                return None
            return self._send(200, instance.encode() * 100)

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = OrthancClient(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=10)
    try:
        (tmp_path / "a").mkdir()
        with pytest.raises(OrthancError, match=r"instances/i3/file: HTTP 503"):
            client.download_instances("S", tmp_path / "a", workers=2, attempts=3)
        assert calls["/instances/i3/file"] == 3
        assert all(not p.name.endswith(".partial") for p in (tmp_path / "a").iterdir())
        broken.clear()
        (tmp_path / "b").mkdir()
        files = client.download_instances("S", tmp_path / "b", workers=2, attempts=3)
        assert [p.read_bytes() for p in files] == [b"i1" * 100, b"i2" * 100, b"i3" * 100]  # the cut body retried
        assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["i1.dcm", "i2.dcm", "i3.dcm"]
        assert encodings == {"identity"}
        (tmp_path / "c").mkdir()
        with pytest.raises(OrthancError, match="instances/gone/file: HTTP 404"):  # deleted meanwhile: not retried
            client.download_instances("S2", tmp_path / "c", attempts=3)
        assert calls["/instances/gone/file"] == 1
        (tmp_path / "d").mkdir()
        with pytest.raises(OrthancError, match="1 files for the 2 instances Orthanc lists"):  # the count is checked
            client.download_instances("S3", tmp_path / "d")
        with pytest.raises(ValueError, match="at least 1"):
            client.download_instances("S", tmp_path / "b", workers=0)
    finally:
        client.close()
        server.shutdown()
        server.server_close()


def test_retry_takes_a_unique_prefix_of_the_series_id(tmp_path: Path) -> None:
    """`router retry` with the 8 characters `status` shows (or any unique prefix); an ambiguous prefix names
    the candidates, an unknown one says where the IDs are; each in one line."""
    ids = ["3f2a9c1e-0b1d2c3e-4f5a6b7c-8d9e0f1a-2b3c4d5e", "3f2b0000-0b1d2c3e-4f5a6b7c-8d9e0f1a-2b3c4d5e",
           "a0000000-0b1d2c3e-4f5a6b7c-8d9e0f1a-2b3c4d5e"]
    with StateStore(tmp_path / "router.sqlite") as store:
        store.record_changes([NewSeries(i, f"1.2.{n}", "1.2", False, "modality SEG") for n, i in enumerate(ids)], 3)
        store.record_changes([NewSeries("queued-one", "1.3", "1.2", True, "ok")], 4)
        assert store.resolve("3f2a9c1e") == ids[0] and store.resolve(ids[1]) == ids[1]
        assert store.resolve("3F2A") == ids[0]  # Orthanc's IDs are lower case
        with pytest.raises(LookupError, match=r"3f2: 2 series start with it \(3f2a9c1e-.*, 3f2b0000-.*\); give more"):
            store.resolve("3f2")
        with pytest.raises(LookupError, match="no series .* starts with it; see the IDs in brackets"):
            store.resolve("ffff")

    def retry(*ids_given: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "router", "retry", *ids_given, "--state-dir", str(tmp_path)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)

    result = retry("3f2", "queued")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 2 and "give more characters" in errors[0] and "the router has it already" in errors[1]
    assert retry("a0000000").returncode == 0
    with StateStore(tmp_path / "router.sqlite") as store:
        assert {r.orthanc_id for r in store.rows("queued")} == {"queued-one", ids[2]}


def test_stack_without_weights_fails_at_once_naming_the_fix(tmp_path: Path, test_model_repository: Path) -> None:
    """`router stack` on a model repository without the bundle's weights: one line naming the models and the
    install command, exit 1, and nothing started (no state folder, no Orthanc storage); with the weights
    installed the check passes."""
    from router.service import RouterConfig
    from router.stack import StackOptions, preflight
    from wholebody.bundle import copy_model_repository

    empty = copy_model_repository(tmp_path / "repo")
    result = subprocess.run([sys.executable, "-m", "router", "stack", "--model-repository", str(empty),
                             "--state-dir", str(tmp_path / "state"), "--dicom-port", "0", "--http-port", "0",
                             "--no-viewer"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no weights in segresnet_highres_torch_amp" in result.stderr
    assert "python -m wholebody.bundle install --bundle" in result.stderr
    assert not (tmp_path / "state").exists()
    options = StackOptions(state_dir=tmp_path / "ok", router=RouterConfig("", [], tmp_path / "ok"), dicom_port=0,
                           http_port=0, model_repository=test_model_repository)
    preflight(options)  # the test bundle is installed there: nothing to say
    with pytest.raises(RuntimeError, match="no model repository there"):
        preflight(StackOptions(state_dir=tmp_path, router=options.router, dicom_port=0, http_port=0,
                               model_repository=tmp_path / "nowhere"))
