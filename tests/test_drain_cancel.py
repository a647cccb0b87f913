"""Disruptions, against real tritonservers: SIGTERM drains the scans in flight (readiness false, new
scans refused, those in flight answered) and a cancelled request stops its stage within one batch."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests.test_hardening import _alive, _children, _strings, _tensor, ensemble_inputs
from wholebody.contract import ENSEMBLE, LABEL_MAP, NORMALIZED_IMAGE, PREPROCESS, SLIDING_WINDOW
from wholebody.triton_server import LocalTritonServer
from wholebody.triton_server.ports import free_port
from wholebody.triton_server.processes import cpu_seconds, process_group


def _ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_sigterm_drains_the_scans_in_flight(test_model_repository: Path, tmp_path: Path) -> None:
    """Three scans in flight (one in sliding_window, two queued) when the launcher gets SIGTERM: the
    server turns not ready at once, refuses a new scan, answers all three, then exits and cleans up."""
    ports = [free_port() for _ in range(3)]
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "wholebody.triton_server", "serve", "--model-repository", str(test_model_repository),
           "--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port", str(ports[2]),
           "--log", str(log), "--drain-seconds", "240"]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"127.0.0.1:{ports[0]}"
    try:
        deadline = time.monotonic() + 180
        while not _ready(ports[1]):
            assert launcher.poll() is None and time.monotonic() < deadline, "launcher did not come up"
            time.sleep(0.5)
        (tritonserver,) = _children(launcher.pid)
        serving = process_group(tritonserver)
        scan = np.full((96, 96, 96), -1000.0, np.float32)  # one window each at 3 mm
        results: dict[int, object] = {}

        def segment(i: int) -> None:
            try:
                client = grpcclient.InferenceServerClient(url)
                results[i] = client.infer(ENSEMBLE, ensemble_inputs(grpcclient, scan, resolution="lowres"))
            except InferenceServerException as exc:
                results[i] = exc

        threads = [threading.Thread(target=segment, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
            time.sleep(0.3)
        time.sleep(1.0)
        assert not results, "the scans should still be in flight"
        signalled = time.monotonic()
        launcher.send_signal(signal.SIGTERM)
        while _ready(ports[1]):
            assert time.monotonic() - signalled < 2, "still ready 2 s after SIGTERM"
            time.sleep(0.05)
        not_ready_s = time.monotonic() - signalled
        late = grpcclient.InferenceServerClient(url)
        with pytest.raises(InferenceServerException, match="unknown model|no available versions"):
            late.infer(ENSEMBLE, ensemble_inputs(grpcclient, scan, resolution="lowres"))
        ready_during_drain = []
        while any(t.is_alive() for t in threads):
            ready_during_drain.append(_ready(ports[1]))
            time.sleep(0.2)
        drained_s = time.monotonic() - signalled
        output = launcher.communicate(timeout=120)[0]
        assert launcher.returncode == 0, output
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    for i in range(3):
        assert not isinstance(results[i], Exception), f"scan {i} failed: {results[i]}"
        assert results[i].as_numpy(LABEL_MAP).shape == scan.shape  # type: ignore[attr-defined]
    assert not any(ready_during_drain)
    assert "drain: nothing in flight" in output
    print(f"not ready {not_ready_s:.2f} s after SIGTERM; 3 scans answered {drained_s:.1f} s after it")
    assert process_group(tritonserver) == [] and [p for p in serving if _alive(p)] == []
    assert sorted(Path("/dev/shm").glob(f"wholebody_{launcher.pid}_*")) == []


def _log_line(server: LocalTritonServer, text: str, offset: int, timeout_s: float) -> str | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in Path(str(server.log_path)).read_text(errors="replace")[offset:].splitlines():
            if text in line:
                return line
        time.sleep(0.1)
    return None


def test_a_cancelled_request_stops_the_sliding_window_within_one_batch(server: LocalTritonServer) -> None:
    """A client that cancels (timeout, abort, Ctrl-C) frees the stage: it stops before its next batch of
    windows, the server's own log says after how many, and the next request is answered."""
    image = np.random.default_rng(0).normal(size=(150, 150, 150)).astype(np.float32)  # 8 windows
    inputs = [_tensor(grpcclient, NORMALIZED_IMAGE, image, "FP32"), *_strings(grpcclient, resolved_resolution="lowres")]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    offset = len(Path(str(server.log_path)).read_text(errors="replace"))
    started = time.monotonic()
    context = client.async_infer(SLIDING_WINDOW, inputs, callback=lambda result, error: None)
    time.sleep(4.0)
    cpu_at_cancel = cpu_seconds(server.pids())
    cancelled = time.monotonic()
    context.cancel()
    line = _log_line(server, "request cancelled after", offset, timeout_s=120)
    assert line is not None, "the stage did not report the cancellation"
    stopped = time.monotonic()
    done, total = (int(n) for n in line.rsplit("after ", 1)[1].split()[0].split("/"))
    assert total == 8 and done < total, line
    # within one batch: no more than one window's time (the average so far, with slack) after the cancel
    per_window = (stopped - started) / max(done, 1)
    assert stopped - cancelled <= 1.5 * per_window + 1.0, (stopped - cancelled, per_window, line)
    cpu_after = cpu_seconds(server.pids()) - cpu_at_cancel
    print(f"{line.strip()}; stopped {stopped - cancelled:.1f} s after the cancel ({per_window:.1f} s per window), "
          f"{cpu_after:.1f} server CPU-s")
    small = np.full((20, 18, 16), -1000.0, np.float32)
    labels = client.infer(ENSEMBLE, ensemble_inputs(grpcclient, small, resolution="lowres")).as_numpy(LABEL_MAP)
    assert labels.shape == small.shape


def _successes(client: grpcclient.InferenceServerClient, model: str) -> int:
    """How many requests `model` has answered successfully (the server's own statistics)."""
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


def test_a_scan_cancelled_in_its_sliding_window_skips_postprocess(server: LocalTritonServer) -> None:
    """Triton 2.51's ensemble checks a cancelled scan between steps: the step in flight is not told (its
    `is_cancelled()` stays False, core PR #263, server issue #6739), the next step's request arrives
    cancelled and is answered without computing."""
    scan = np.full((120, 120, 120), -1000.0, np.float32)  # 8 windows at 3 mm
    client = grpcclient.InferenceServerClient(server.grpc_url)
    offset = len(Path(str(server.log_path)).read_text(errors="replace"))
    preprocessed = _successes(client, PREPROCESS)
    context = client.async_infer(ENSEMBLE, ensemble_inputs(grpcclient, scan, resolution="lowres"),
                                 callback=lambda result, error: None)
    deadline = time.monotonic() + 120
    while _successes(client, PREPROCESS) == preprocessed:  # then the scan is in its sliding window
        assert time.monotonic() < deadline, "preprocess did not finish"
        time.sleep(0.1)
    context.cancel()
    line = _log_line(server, "postprocess_0_0 INFO: request cancelled before it started", offset, timeout_s=240)
    assert line is not None, "postprocess computed a cancelled scan"
