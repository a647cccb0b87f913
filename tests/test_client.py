"""The client against real tritonservers (CPU, the small test network): a cohort with bad files,
resume, output checks before any request, timeouts with shared memory, a server killed mid-run,
INT16 vs FP32, and the HTTP and curl examples of docs/wire-contract.md."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import SegmentationClient
from client.__main__ import main as client_main
from client.cohort import MANIFEST_NAME, CohortOptions, Record, read_manifest, run_cohort
from client.inputs import discover
from client.outputs import NiftiLabelMapWriter, plan_outputs
from client.segmentation_client import SHM_PREFIX
from wholebody.contract import AFFINE, IMAGE, IMAGE_INT16, LABEL_MAP, PREPROCESS, REPO_ROOT
from wholebody.sample_data import synthetic_ct
from wholebody.triton_server import LocalTritonServer
from wholebody.health import answered_requests

log = logging.getLogger(__name__)
WIRE_CONTRACT = REPO_ROOT / "docs" / "wire-contract.md"


def small_ct(path: Path, shape: tuple[int, int, int] = (40, 36, 30), seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(synthetic_ct(shape, (3.0, 3.0, 3.0), seed=seed), path)
    return path


def labels_of(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)



def our_regions(server: LocalTritonServer) -> tuple[list[str], list[str]]:
    """Shared-memory regions of this process registered on the server, and left in /dev/shm."""
    prefix = f"{SHM_PREFIX}_{os.getpid()}_"
    status = grpcclient.InferenceServerClient(server.grpc_url).get_system_shared_memory_status(as_json=True)
    registered = [name for name in status.get("regions", {}) if name.startswith(prefix)]
    return registered, [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def test_cohort_with_bad_files_then_resume(
    server: LocalTritonServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cohort = tmp_path / "cohort"
    small_ct(cohort / "s0001" / "ct.nii.gz", seed=1)
    small_ct(cohort / "s0002" / "ct.nii.gz", seed=2)
    small_ct(cohort / "UPPER.NII.GZ", shape=(30, 30, 20), seed=3)
    raw = (cohort / "s0001" / "ct.nii.gz").read_bytes()
    (cohort / "s0003").mkdir()
    (cohort / "s0003" / "ct.nii.gz").write_bytes(raw[: len(raw) // 2])
    (cohort / "s0004.nrrd").write_text("NRRD0004\ntype: short\n")
    out = tmp_path / "labels"
    args = [str(cohort), "-o", str(out), "-u", server.grpc_url, "--resolution", "lowres", "-q", "--jobs", "2"]
    with caplog.at_level(logging.ERROR):
        assert client_main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2, errors
    assert any("s0003/ct.nii.gz: truncated or corrupt gzip data" in e for e in errors)
    assert any("s0004.nrrd: NRRD files are not supported" in e for e in errors)
    outputs = sorted(str(p.relative_to(out)) for p in out.rglob("*.nii.gz"))
    assert outputs == ["UPPER_seg.nii.gz", "s0001/ct_seg.nii.gz", "s0002/ct_seg.nii.gz"]
    assert not [p for p in out.rglob(".*")]  # no temporary file left
    first, second = labels_of(out / "s0001" / "ct_seg.nii.gz"), labels_of(out / "s0002" / "ct_seg.nii.gz")
    assert first.shape == (40, 36, 30) and not np.array_equal(first, second)  # two patients, two results
    with SegmentationClient(server.grpc_url) as seg:
        assert np.array_equal(seg.segment_file(cohort / "s0002" / "ct.nii.gz", tmp_path / "x.nii.gz",
                                               resolution="lowres").label_map, second)
    # the same command again, bad files fixed: every scan skipped, exit 0, nothing rewritten
    (cohort / "s0003" / "ct.nii.gz").unlink()
    (cohort / "s0004.nrrd").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    requests = answered_requests(server.grpc_url)
    assert client_main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert answered_requests(server.grpc_url) == requests
    records = read_manifest(out / MANIFEST_NAME)
    assert sorted((r["input"], r["status"]) for r in records) == sorted(
        (str(cohort / name), "skipped") for name in ("UPPER.NII.GZ", "s0001/ct.nii.gz", "s0002/ct.nii.gz"))
    history = read_manifest(out / MANIFEST_NAME, latest_run_only=False)
    assert sorted(r["status"] for r in history if r not in records) == ["done", "done", "done", "failed"]


def test_output_that_is_a_file_is_refused_before_any_request(
    server: LocalTritonServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ct = small_ct(tmp_path / "ct.nii.gz")
    target = tmp_path / "labels.nii.gz"
    target.write_bytes(b"precious")
    requests = answered_requests(server.grpc_url)
    with caplog.at_level(logging.ERROR):
        assert client_main([str(ct), "-o", str(target), "-u", server.grpc_url, "-q"]) == 2
    assert "is a file, not a folder" in caplog.text
    assert answered_requests(server.grpc_url) == requests and target.read_bytes() == b"precious"


def test_timeout_with_shared_memory_leaves_no_region(
    server: LocalTritonServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ct = small_ct(tmp_path / "ct.nii.gz", seed=5)
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = client_main([str(ct), "-o", str(out), "-u", server.grpc_url, "--timeout", "0.5", "-q",
                            "--resolution", "lowres"])
    assert code == 1
    assert re.search(r"ct\.nii\.gz: timed out after 0\.5 s", caplog.text)
    # main() returned after the server finished the abandoned request: nothing of ours is left
    assert our_regions(server) == ([], [])
    assert not list(out.glob("*.nii.gz"))


def test_int16_and_fp32_give_identical_labels(server: LocalTritonServer, tmp_path: Path) -> None:
    image = nib.load(small_ct(tmp_path / "ct.nii.gz", seed=7))
    volume = np.asarray(image.dataobj)
    assert volume.dtype == np.int16
    with SegmentationClient(server.grpc_url) as seg:
        assert seg.accepts_int16()
        as_int16 = seg.segment(volume, image.affine, resolution="lowres")
        as_fp32 = seg.segment(volume.astype(np.float32), image.affine, resolution="lowres")
    assert np.array_equal(as_int16, as_fp32)
    # preprocess, which both ensembles feed, takes exactly one of the two image inputs
    client = grpcclient.InferenceServerClient(server.grpc_url)
    affine = grpcclient.InferInput(AFFINE, [4, 4], "FP64")
    affine.set_data_from_numpy(np.asarray(image.affine, np.float64))
    both = [grpcclient.InferInput(IMAGE, list(volume.shape), "FP32"),
            grpcclient.InferInput(IMAGE_INT16, list(volume.shape), "INT16")]
    both[0].set_data_from_numpy(volume.astype(np.float32))
    both[1].set_data_from_numpy(volume)
    for given in ([], both):
        with pytest.raises(InferenceServerException, match="exactly one of the inputs 'image'"):
            client.infer(PREPROCESS, [affine, *given])


def _readme_block(marker: str) -> str:
    text = WIRE_CONTRACT.read_text()
    block = text[text.index(f"<!-- {marker} -->"):]
    return block.split("```", 2)[1].split("\n", 1)[1]


def test_readme_http_and_curl_examples_equal_grpc(server: LocalTritonServer, tmp_path: Path) -> None:
    ct = small_ct(tmp_path / "ct.nii.gz", seed=9)
    image = nib.load(ct)
    with SegmentationClient(server.grpc_url) as seg:
        expected = seg.segment(np.asarray(image.dataobj), image.affine, resolution="lowres")
    code = _readme_block("http-example").replace("localhost:8000", server.http_url)
    code = code.replace('"ct.nii.gz"', repr(str(ct)))
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/wire-contract.md http-example", "exec"), namespace)  # noqa: S102
    assert np.array_equal(namespace["labels"], expected)
    assert namespace["names"][:2] == ["background", "spleen"]  # type: ignore[index]
    # curl: the page's shape and affine are those of this synthetic CT
    assert image.shape == (40, 36, 30) and np.allclose(image.affine[:3, 3], [-60, -54, -45])
    np.ascontiguousarray(image.dataobj, "<i2").tofile(tmp_path / "ct.raw")
    script = _readme_block("curl-example").replace("localhost:8000", server.http_url)
    subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, check=True, timeout=300)
    headers = (tmp_path / "response.headers").read_text()
    match = re.search(r"(?i)inference-header-content-length:\s*(\d+)", headers)
    assert match is not None
    length = int(match.group(1))
    body = (tmp_path / "response.bin").read_bytes()
    assert json.loads(body[:length])["outputs"][0]["name"] == LABEL_MAP
    assert np.array_equal(np.frombuffer(body[length:], np.uint8).reshape(image.shape), expected)


def test_a_server_killed_mid_run_loses_no_scan(
    server: LocalTritonServer, test_model_repository: Path, tmp_path: Path
) -> None:
    cohort = tmp_path / "cohort"
    for i in range(6):
        small_ct(cohort / f"s{i:04d}" / "ct.nii.gz", shape=(40, 36, 30 - 2 * i), seed=10 + i)
    scans = discover([cohort]).scans
    writers = [NiftiLabelMapWriter()]
    single = tmp_path / "single"
    options = CohortOptions(output_dir=single, resolution="lowres")
    reference = run_cohort(plan_outputs(scans, single, writers, "_seg"), [server.grpc_url], options, writers)
    assert reference.count("done") == 6
    out = tmp_path / "two"
    plan = plan_outputs(scans, out, writers, "_seg")
    with LocalTritonServer(model_repository=test_model_repository) as victim:
        killed: list[str] = []

        def kill_on_first_result(record: Record) -> None:
            if not killed:
                killed.append(record.input)
                os.killpg(victim.process.pid, signal.SIGKILL)  # type: ignore[union-attr]

        options = CohortOptions(output_dir=out, resolution="lowres", jobs=1, timeout_s=300)
        summary = run_cohort(plan, [server.grpc_url, victim.grpc_url], options, writers, on_record=kill_on_first_result)
    log.info("two servers, one killed: %s", summary.line())
    assert summary.count("done") == 6 and summary.count("failed") == 0
    assert any(r.attempts > 1 for r in summary.records), "no scan was in flight on the killed server"
    assert all(r.server == server.grpc_url for r in summary.records if r.attempts > 1)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted([Path(MANIFEST_NAME)] + [Path(f"s{i:04d}/ct_seg.nii.gz") for i in range(6)])
    for i in range(6):
        name = Path(f"s{i:04d}") / "ct_seg.nii.gz"
        assert np.array_equal(labels_of(out / name), labels_of(single / name))
    assert our_regions(server) == ([], [])


def test_two_cohorts_with_one_layout_into_one_folder_never_swap_patients(
    server: LocalTritonServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Cohort B (other patients, the same s000N/ct.nii.gz layout) into cohort A's -o: not one of A's label
    maps is taken as B's result, none is replaced, and no request is sent; a concurrent run is refused."""
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "labels"
    for i in range(2):
        small_ct(a / f"s000{i}" / "ct.nii.gz", seed=20 + i)
        small_ct(b / f"s000{i}" / "ct.nii.gz", seed=30 + i)
    common = ["-o", str(out), "-u", server.grpc_url, "--resolution", "lowres", "-q"]
    assert client_main([str(a), *common]) == 0
    made = {p: p.read_bytes() for p in out.rglob("*.nii.gz")}
    requests = answered_requests(server.grpc_url)
    with caplog.at_level(logging.ERROR):
        assert client_main([str(b), *common]) == 1
    refused = [r.getMessage() for r in caplog.records if "was made from another input" in r.getMessage()]
    assert len(refused) == 2 and all(str(a) in line and "--overwrite replaces it" in line for line in refused)
    assert {p: p.read_bytes() for p in made} == made and answered_requests(server.grpc_url) == requests
    assert all(r["status"] == "failed" for r in read_manifest(out / MANIFEST_NAME))
    # at the same time: the second run is refused before any request, naming the first
    first = subprocess.Popen([sys.executable, "-m", "client", str(a), *common, "--overwrite"], cwd=REPO_ROOT,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / ".segmentation.lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            code = client_main([str(b), *common, "--overwrite"])
    finally:
        _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    if code != 2:  # the first run ended before the second reached the lock
        pytest.skip(f"the first run ended before the second started (exit {code}); timing, not a fault")
    assert f"another run is writing there (pid {first.pid} on" in caplog.text


def test_a_volume_moves_into_its_shared_memory_region_and_is_held_once(
    server: LocalTritonServer, example_ct: Path, tmp_path: Path
) -> None:
    """With shared memory the client copies the volume into the request's region and keeps that copy
    (Volume.adopt) instead of its own: the volume is held once during the request (issue 20, item 5)."""
    import gc
    import weakref

    from client.inputs import NiftiFormat

    volume = NiftiFormat().read_volume(example_ct)
    expected = np.array(volume.array)
    own = weakref.ref(volume.array)
    with SegmentationClient(server.grpc_url) as seg:
        labels = seg.segment_volume(volume, "lowres")
        gc.collect()
        assert own() is None, "the client still holds its own copy of the volume"
        assert np.array_equal(volume.array, expected) and volume.array.flags.c_contiguous
        assert volume.like.dataobj is volume.array
        reference = seg.segment_file(example_ct, tmp_path / "ct_seg.nii.gz", resolution="lowres").label_map
    assert np.array_equal(labels, reference)
    assert our_regions(server) == ([], [])
