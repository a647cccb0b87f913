"""Safe on a network, against real tritonservers: a locked control API, every stage defending itself,
caller faults as INVALID_ARGUMENT / HTTP 400, a dead stub healed or reported, a launcher that leaves
nothing behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException
from tritonclient.utils import shared_memory as shm

from perf.gpu_session import drop_parameter, set_parameters
from perf.hardening import unregister
from perf.run import host_memory_bytes
from tests.conftest import TEST_MAX_INPUT_VOXELS, TEST_MAX_RESAMPLED_VOXELS
from tests.test_serving import BAD_INPUTS, EYE3
from wholebody import health
from wholebody.contract import (
    AFFINE,
    ENSEMBLE,
    IMAGE,
    LABEL_MAP,
    LOGITS,
    NETWORK,
    NORMALIZED_IMAGE,
    ORIENTED_AFFINE,
    ORIENTED_SHAPE,
    POSTPROCESS,
    PREPROCESS,
    RESAMPLED_AFFINE,
    RESAMPLED_LABEL_MAP,
    RESOLUTION,
    RESOLVED_RESOLUTION,
    SLIDING_WINDOW,
    WINDOW,
    network_model_name,
)
from wholebody.triton_server import LocalTritonServer
from wholebody.triton_server.locks import operator_headers
from wholebody.triton_server.ports import free_port
from wholebody.triton_server.processes import process_group
from wholebody.triton_server.stubs import stub_models
from wholebody.triton_server.watchdog import StubWatchdog
from wholebody.validation import ConfigError, InvalidRequestError, SizeLimits, float_parameter

NETWORK_MODEL = network_model_name("lowres", "torch_fp32")
PIPELINE = [ENSEMBLE, PREPROCESS, SLIDING_WINDOW, POSTPROCESS, NETWORK_MODEL]


def _tensor(module: object, name: str, array: np.ndarray, datatype: str) -> object:
    tensor = module.InferInput(name, list(array.shape), datatype)  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(array)
    return tensor


def _strings(module: object, **values: str) -> list[object]:
    return [_tensor(module, k, np.array([v.encode()], dtype=np.object_), "BYTES") for k, v in values.items()]


def ensemble_inputs(module: object, image: np.ndarray, affine: np.ndarray = EYE3, **strings: str) -> list[object]:
    return [_tensor(module, IMAGE, image, "FP32"), _tensor(module, AFFINE, affine.astype(np.float64), "FP64"),
            *_strings(module, **strings)]


def small_image() -> np.ndarray:
    image = np.full((20, 18, 16), -1000.0, np.float32)
    image[5:15, 5:13, 4:12] = 40.0
    return image


def segment(client: grpcclient.InferenceServerClient, image: np.ndarray) -> np.ndarray:
    return client.infer(ENSEMBLE, ensemble_inputs(grpcclient, image, resolution="lowres")).as_numpy(LABEL_MAP)


def grpc_status(exc: InferenceServerException) -> str:
    return str(exc.status()).removeprefix("StatusCode.")


# --- 1. the control API is locked ------------------------------------------------------------------
def test_plain_clients_cannot_upload_load_or_unload_models(server: LocalTritonServer) -> None:
    grpc = grpcclient.InferenceServerClient(server.grpc_url)
    http = httpclient.InferenceServerClient(server.http_url)
    evil = {"file:1/model.py": b"import os\nos.system('touch /tmp/pwned')\n"}
    config = '{"backend": "python"}'
    for call in (
        lambda: grpc.load_model("evil", config=config, files=evil),
        lambda: grpc.unload_model(ENSEMBLE),
        lambda: grpc.get_model_repository_index(),
        lambda: grpc.load_model(ENSEMBLE, headers=operator_headers("wrong-key")),
    ):
        with pytest.raises(InferenceServerException, match="restricted") as info:
            call()
        assert grpc_status(info.value) == "UNAVAILABLE"
    for call in (lambda: http.load_model("evil", config=config, files=evil), lambda: http.unload_model(ENSEMBLE)):
        with pytest.raises(InferenceServerException, match="restricted") as info:
            call()
        assert info.value.status() == "403"
    # what ordinary clients need stays open
    assert grpc.is_model_ready(ENSEMBLE) and http.is_model_ready(ENSEMBLE)
    limit = grpc.get_model_config(ENSEMBLE).config.parameters["max_input_voxels"].string_value
    assert limit == str(TEST_MAX_INPUT_VOXELS)
    assert grpc.get_inference_statistics(ENSEMBLE).model_stats
    assert grpc.get_system_shared_memory_status() is not None
    assert not Path("/tmp/pwned").exists()


# --- 2 + 6. every stage defends itself; caller faults are 400 / INVALID_ARGUMENT ---------------------
CLIENT_FAULTS = {
    **{case: (image, affine, strings, datatype) for case, (image, affine, strings, datatype, _) in BAD_INPUTS.items()},
    "wrongly_cased_resolution": (small_image(), EYE3, {RESOLUTION: "Lowres"}, "FP32"),
}


@pytest.mark.parametrize("case", sorted(CLIENT_FAULTS))
def test_caller_faults_answer_invalid_argument_and_http_400(server: LocalTritonServer, case: str) -> None:
    image, affine, strings, datatype = CLIENT_FAULTS[case]
    for module, url in ((grpcclient, server.grpc_url), (httpclient, server.http_url)):
        client = module.InferenceServerClient(url)
        inputs = [_tensor(module, IMAGE, image, datatype), _tensor(module, AFFINE, affine.astype(np.float64), "FP64"),
                  *_strings(module, **strings)]
        with pytest.raises(InferenceServerException) as info:
            client.infer(ENSEMBLE, inputs)
        status = grpc_status(info.value) if module is grpcclient else info.value.status()
        assert status in ("INVALID_ARGUMENT", "400"), f"{case}: {status} {info.value.message()}"


def test_a_network_that_is_not_loaded_is_refused_before_preprocessing(server: LocalTritonServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    def sliding_window_runs() -> int:
        stats = client.get_inference_statistics(SLIDING_WINDOW, as_json=True)["model_stats"][0]
        return int(stats.get("execution_count", 0))

    before = sliding_window_runs()
    refusal = r"'trt_fp16' \(segresnet_lowres_trt_fp16\) is not loaded.*torch_fp32"
    with pytest.raises(InferenceServerException, match=refusal) as info:
        client.infer(ENSEMBLE, ensemble_inputs(grpcclient, small_image(), resolution="lowres", network="trt_fp16"))
    assert grpc_status(info.value) == "INVALID_ARGUMENT"
    assert sliding_window_runs() == before  # refused by preprocess's first checks


def test_direct_oversize_requests_to_internal_models_are_refused(server: LocalTritonServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    side = round(TEST_MAX_RESAMPLED_VOXELS ** (1 / 3)) + 2  # ~42 MB of float32, just over the limit
    volume = np.zeros((side, side, side), np.float32)
    over = f"above this server's limit of {TEST_MAX_RESAMPLED_VOXELS:,}"
    with pytest.raises(InferenceServerException, match=over) as info:
        client.infer(SLIDING_WINDOW, [_tensor(grpcclient, NORMALIZED_IMAGE, volume, "FP32"),
                                      *_strings(grpcclient, **{RESOLVED_RESOLUTION: "lowres"})])
    assert grpc_status(info.value) == "INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="unknown resolution ''") as info:
        client.infer(SLIDING_WINDOW, [_tensor(grpcclient, NORMALIZED_IMAGE, np.zeros((8, 8, 8), np.float32), "FP32"),
                                      *_strings(grpcclient, **{RESOLVED_RESOLUTION: ""})])
    assert grpc_status(info.value) == "INVALID_ARGUMENT"
    windows = np.zeros((9, 1, 96, 96, 96), np.float32)  # one more than the network's max_batch_size
    with pytest.raises(InferenceServerException, match="batch-size must be <= 8") as info:
        client.infer(
            NETWORK_MODEL,
            [_tensor(grpcclient, WINDOW, windows, "FP32")],
            outputs=[grpcclient.InferRequestedOutput(LOGITS)],
        )
    assert grpc_status(info.value) == "INVALID_ARGUMENT"
    # postprocess's output size comes from oriented_shape: a tiny request must not allocate a huge map
    inputs = [
        _tensor(grpcclient, RESAMPLED_LABEL_MAP, np.zeros((4, 4, 4), np.uint8), "UINT8"),
        _tensor(grpcclient, RESAMPLED_AFFINE, EYE3, "FP64"),
        _tensor(grpcclient, ORIENTED_AFFINE, EYE3, "FP64"),
        _tensor(grpcclient, ORIENTED_SHAPE, np.array([100_000, 100_000, 100_000], np.int64), "INT64"),
        _tensor(grpcclient, AFFINE, EYE3, "FP64"),
    ]
    with pytest.raises(InferenceServerException, match=f"oriented_shape has .* above this server's limit") as info:
        client.infer(POSTPROCESS, inputs)
    assert grpc_status(info.value) == "INVALID_ARGUMENT"
    assert client.is_server_ready() and all(client.is_model_ready(m) for m in PIPELINE)
    labels = client.infer(ENSEMBLE, ensemble_inputs(grpcclient, small_image(), resolution="lowres")).as_numpy(LABEL_MAP)
    assert labels.shape == small_image().shape


# --- 5. reject cheaply -------------------------------------------------------------------------------
def test_oversize_volume_over_shared_memory_is_refused_without_keeping_memory(server: LocalTritonServer) -> None:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    shape = (300, 300, 280)  # 25 M voxels: 101 MB, over the 8 M input limit and the watchdog's 64 MiB pool bound
    volume = np.zeros(shape, np.float32)
    assert server.wait_lean(), "large pools stayed on the idle server"
    before = host_memory_bytes(server.pids())
    name = f"wholebody_test_{os.getpid()}"
    region = shm.create_shared_memory_region(name, f"/{name}", volume.nbytes)
    try:
        shm.set_shared_memory_region(region, [volume])
        client.register_system_shared_memory(name, f"/{name}", volume.nbytes)
        image = grpcclient.InferInput(IMAGE, list(shape), "FP32")
        image.set_shared_memory(name, volume.nbytes)
        with pytest.raises(InferenceServerException, match=f"limit of {TEST_MAX_INPUT_VOXELS:,}") as info:
            client.infer(ENSEMBLE, [image, _tensor(grpcclient, AFFINE, EYE3, "FP64")])
        assert grpc_status(info.value) == "INVALID_ARGUMENT"
    finally:
        unregister(client, name)
        shm.destroy_shared_memory_region(region)
    # The preprocess stub has copied the volume into its pool (Triton's Python backend copies every input;
    # clients refuse locally from the ensemble's max_input_voxels to avoid even that); the idle server
    # must not keep it: the watchdog reloads a stub holding a large pool within seconds.
    assert server.wait_lean(), "the watchdog left large pools on the idle server"
    grown = host_memory_bytes(server.pids()) - before
    assert grown < volume.nbytes / 2, f"grew by {grown / 2**20:.0f} MiB after a refused {volume.nbytes / 2**20:.0f} MiB"


# --- 3. a dead stub: healed by the watchdog, reported by the health command without it -----------------
@pytest.fixture
def pipeline_server(test_model_repository: Path, tmp_path: Path) -> Iterator[LocalTritonServer]:
    """The pipeline with the network model called by BLS (its own stub, to be killed); the CPU default
    runs the network inside the sliding-window stub instead (placement in_process)."""
    repo = shutil.copytree(test_model_repository, tmp_path / "model_repository")
    config = repo / SLIDING_WINDOW / "configs" / "cpu.pbtxt"
    config.write_text(drop_parameter(set_parameters(config.read_text(), placement="bls"), "preload_networks"))
    with LocalTritonServer(model_repository=repo, models=PIPELINE) as running:
        yield running


def _stub_of(server: LocalTritonServer, model: str) -> int:
    return next(pid for pid, name in stub_models(server.pids()).items() if name == model)


def test_a_killed_stub_is_reported_then_healed_within_60_s(
    pipeline_server: LocalTritonServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server = pipeline_server
    client = grpcclient.InferenceServerClient(server.grpc_url)
    assert health.main(["-u", server.grpc_url, "--timeout", "60"]) == 0
    assert capsys.readouterr().out.startswith("healthy: lowres/torch_fp32")
    # busy with a long CT (8 windows) is not dead: the check waits behind it or sees windows computed
    busy = np.full((120, 120, 120), -1000.0, np.float32)
    long_request = threading.Thread(
        target=lambda: grpcclient.InferenceServerClient(server.grpc_url).infer(
            ENSEMBLE, ensemble_inputs(grpcclient, busy, resolution="lowres")
        )
    )
    long_request.start()
    time.sleep(1)
    assert health.main(["-u", server.grpc_url, "--timeout", "8"]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.startswith("healthy")
    long_request.join(timeout=300)
    assert not long_request.is_alive()

    os.kill(_stub_of(server, NETWORK_MODEL), signal.SIGKILL)  # what the OOM killer does
    time.sleep(0.5)
    # a real internal fault: INTERNAL / HTTP 500, not the caller's 400
    with pytest.raises(InferenceServerException, match="not healthy") as info:
        client.infer(ENSEMBLE, ensemble_inputs(grpcclient, small_image(), resolution="lowres"))
    assert grpc_status(info.value) == "INTERNAL"
    with pytest.raises(InferenceServerException) as http_info:
        http = httpclient.InferenceServerClient(server.http_url)
        http.infer(ENSEMBLE, ensemble_inputs(httpclient, small_image(), resolution="lowres"))
    assert http_info.value.status() == "500"
    # without the watchdog (--no-watchdog, or tritonserver run bare): the liveness check fails
    assert health.main(["-u", server.grpc_url, "--timeout", "60"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("unhealthy: ") and "not healthy" in out and out.count("\n") == 1

    # the launcher's watchdog (on by default in `serve`) reloads the model with the operator key
    killed = time.monotonic()
    watchdog = server.start_watchdog(interval_s=1.0)
    while True:
        try:
            labels = segment(client, small_image())
            break
        except InferenceServerException:
            assert time.monotonic() - killed < 60, "not serving again 60 s after the stub died"
            time.sleep(0.5)
    assert labels.shape == small_image().shape
    assert [(model, why) for model, why, _ in watchdog.reloads][:1] == [(NETWORK_MODEL, "a Python backend stub died")]
    assert health.main(["-u", server.grpc_url, "--timeout", "60"]) == 0

    # an operator's unload is respected by the watchdog, and the key reloads
    headers = operator_headers(server.operator_key)
    client.unload_model(NETWORK_MODEL, headers=headers)
    with pytest.raises(InferenceServerException, match="not loaded") as info:
        client.infer(ENSEMBLE, ensemble_inputs(grpcclient, small_image(), resolution="lowres", network="torch_fp32"))
    assert grpc_status(info.value) == "INVALID_ARGUMENT"
    time.sleep(2.5)
    assert not client.is_model_ready(NETWORK_MODEL)
    client.load_model(NETWORK_MODEL, headers=headers)
    assert segment(client, small_image()).shape == small_image().shape

    # a parameter out of range fails the load (it used to load and leave voxels unlabelled); the
    # model already loaded keeps serving
    config = client.get_model_config(SLIDING_WINDOW, as_json=True)["config"]
    config["parameters"]["overlap"] = {"string_value": "-0.5"}
    with pytest.raises(InferenceServerException, match=r"'overlap' must be in \[0.0, 1.0\), got -0.5"):
        client.load_model(SLIDING_WINDOW, config=json.dumps(config), headers=headers)
    assert segment(client, small_image()).shape == small_image().shape


# --- 4. the launcher owns its processes ----------------------------------------------------------------
def _launch(repo: Path, ports: list[int], log: Path, ignore_sigint: bool = False) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "wholebody.triton_server", "serve", "--model-repository", str(repo),
           "--model", POSTPROCESS, "--grpc-port", str(ports[0]), "--http-port", str(ports[1]),
           "--metrics-port", str(ports[2]), "--log", str(log)]
    preexec = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None  # a background job
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[1] == str(pid):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT in the background"])
def test_launcher_stops_server_and_stubs_and_leaves_no_shared_memory(
    test_model_repository: Path, tmp_path: Path, how: str
) -> None:
    ports = [free_port() for _ in range(3)]
    log = tmp_path / "server.log"
    launcher = _launch(test_model_repository, ports, log, ignore_sigint=how != "SIGTERM")
    try:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        deadline = time.monotonic() + 120
        while True:
            try:
                if client.is_model_ready(POSTPROCESS):
                    break
            except InferenceServerException:
                pass
            assert launcher.poll() is None and time.monotonic() < deadline, "launcher did not come up"
            time.sleep(0.5)
        (tritonserver,) = _children(launcher.pid)
        serving = process_group(tritonserver)  # the server leads its own group, its stubs in it
        assert tritonserver in serving and stub_models(serving), "no stub found"
        regions = sorted(Path("/dev/shm").glob(f"wholebody_{launcher.pid}_*"))
        assert regions, "the stub's shared memory region is not named after the launcher"
        launcher.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert process_group(tritonserver) == [], f"processes left: {process_group(tritonserver)}"
    assert [pid for pid in serving if _alive(pid)] == []
    assert sorted(Path("/dev/shm").glob(f"wholebody_{launcher.pid}_*")) == []
    assert log.stat().st_size > 0


def test_launcher_refuses_a_busy_port_and_leaves_the_other_servers_log_alone(
    server: LocalTritonServer, test_model_repository: Path, tmp_path: Path
) -> None:
    assert server.log_path is not None
    other_log = Path(server.log_path)
    head = other_log.read_bytes()
    launcher = _launch(test_model_repository, [free_port(), server.http_port, free_port()], tmp_path / "mine.log")
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    assert f"http port {server.http_port} on 127.0.0.1 is in use" in out.decode()
    assert not (tmp_path / "mine.log").exists()  # refused before opening any log
    assert other_log.read_bytes()[: len(head)] == head  # the other server's log: not truncated
    assert grpcclient.InferenceServerClient(server.grpc_url).is_server_ready()


# --- plain logic --------------------------------------------------------------------------------------
def test_size_limits_and_parameter_ranges() -> None:
    limits = SizeLimits.from_parameters({"max_input_voxels": "1000", "max_resampled_voxels": "500"})
    assert limits.check_input((10, 10, 10)) == 1000
    with pytest.raises(InvalidRequestError, match="1,100 voxels, above this server's limit of 1,000"):
        limits.check_input((10, 10, 11))
    with pytest.raises(InvalidRequestError, match="must be 3-D"):
        limits.check_resampled((10, 10))
    with pytest.raises(InvalidRequestError, match="empty axis"):
        limits.check_resampled((10, 0, 10))
    with pytest.raises(ConfigError, match=r"'max_input_voxels' must be in \[1, "):
        SizeLimits.from_parameters({"max_input_voxels": "-5", "max_resampled_voxels": "500"})
    with pytest.raises(ConfigError, match=r"'overlap' must be in \[0.0, 1.0\), got -0.5"):
        float_parameter({"overlap": "-0.5"}, "overlap", 0.0, 1.0, high_open=True)
    assert float_parameter({}, "x", 0, 1, default=0.5) == 0.5
    assert process_group(-12345) == []


def test_the_watchdog_counts_the_stubs_a_config_asks_for() -> None:
    cpu = {"backend": "python", "instance_group": [{"kind": "KIND_CPU", "count": 2}]}
    gpu = {"backend": "python", "instance_group": [{"kind": "KIND_GPU", "count": 1}]}
    pinned = {"backend": "python", "instance_group": [{"kind": "KIND_GPU", "count": 2, "gpus": [0, 1]}]}
    assert StubWatchdog.configured_stubs(cpu, gpus=0) == 2
    assert StubWatchdog.configured_stubs(gpu, gpus=4) == 4
    assert StubWatchdog.configured_stubs(pinned, gpus=8) == 4
    assert StubWatchdog.configured_stubs({"platform": "ensemble"}) == 0
    assert StubWatchdog.variable_size({"input": [{"dims": ["-1", "-1", "-1"]}]})
    network = {"input": [{"dims": ["1", "96", "96", "96"]}], "output": [{"dims": ["105", "96", "96", "96"]}]}
    assert not StubWatchdog.variable_size(network)
