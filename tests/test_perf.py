"""`python -m perf`: scenario files, perf_analyzer command lines and input data, CSV parsing and table
rendering on hand-written CSVs, and one real perf_analyzer run against the test server (smoke scenario)."""

from __future__ import annotations

import csv
import json
import os
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import pytest

from perf.__main__ import main as perf_main
from perf.network_forward import SETTINGS, run_child
from perf.run import gpu_memory_from_metrics, host_memory_bytes, slugify
from perf.scenarios import (
    Overrides,
    Run,
    ScenarioError,
    apply_overrides,
    available_scenarios,
    load_scenario,
    parse_scenario,
    perf_analyzer_command,
    plan_runs,
    write_inputs,
)
from perf.tables import (
    SPEEDUP_VARIANTS,
    avg_latency_us,
    composing_csvs,
    concurrency,
    gpu_memory_bytes,
    latency_breakdown,
    measured,
    millis,
    read_pa_csv,
    seconds,
    speedup,
)
from wholebody.contract import (
    AFFINE,
    ENSEMBLE,
    IMAGE,
    NETWORK,
    POSTPROCESS,
    PREPROCESS,
    RESOLUTION,
    SLIDING_WINDOW,
    VARIANTS,
    WINDOW,
    network_model_name,
)
from wholebody.triton_server import LocalTritonServer

HEADER = ("Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
          "Server Compute Infer,Server Compute Output,Client Recv")
TOP_HEADER = HEADER + ",p50 latency,p90 latency,p95 latency,p99 latency,Avg latency,request/response,response wait"


def write_csv(path: Path, header: str, values: list[float]) -> None:
    path.write_text(header + "\n" + ",".join(f"{v:g}" for v in values) + "\n")


def fake_end2end(raw: Path, name: str, variant: str, latency_us: float, queue_us: float = 5.0) -> Run:
    """A run's CSVs as perf_analyzer 2.51 writes them for the ensemble with one BLS composing model."""
    network = network_model_name("lowres", variant)
    write_csv(raw / name, TOP_HEADER, [1, 0.5, 10, 0, 2, 300, latency_us - 400, 80, 4,
                                       latency_us, latency_us * 1.1, latency_us * 1.2, latency_us * 1.3,
                                       latency_us, 20, latency_us - 20])
    for model, (queue, c_in, infer, c_out) in {
        PREPROCESS: (queue_us, 100, 1_234_500, 200),
        SLIDING_WINDOW: (2 * queue_us, 50, 3_456_700, 60),
        POSTPROCESS: (3 * queue_us, 10, 456_780, 30),
        network: (7.0, 500, 250_000, 900),
    }.items():
        write_csv(raw / f"{model}_v1.{name}", HEADER, [1, 0.5, 0, 5, queue, c_in, infer, c_out, 0])
    return Run("end2end", "end2end", ENSEMBLE, "lowres", variant, 1, name, network, device="CPU", status="ok",
               command=["perf_analyzer", "-m", ENSEMBLE], percentiles=[50, 95, 99], peak_host_bytes=2_300_000_000,
               write_s=0.176)


# --- scenario files and command lines -------------------------------------------------------------------
def test_every_scenario_file_loads() -> None:
    names = available_scenarios()
    assert {"model_computation", "end2end", "end2end_concurrency", "smoke"} <= set(names)
    for name in names:
        scenario = load_scenario(name)
        assert scenario.variants and set(scenario.variants) <= set(VARIANTS)
    full = load_scenario("end2end")
    assert full.input.shape == (512, 512, 397) and full.input.spacing == (0.84, 0.84, 1.5)
    assert load_scenario("end2end_concurrency").concurrency == (1, 2, 4, 8)


def test_overrides_shrink_a_scenario() -> None:
    scenario = apply_overrides(
        load_scenario("end2end_concurrency"),
        Overrides(ct_shape=(64, 60, 50), requests=2, resolution="lowres", variants=("torch_fp32",), concurrency=(1, 2)),
    )
    assert scenario.input.shape == (64, 60, 50) and scenario.measurement.request_count == 2
    assert scenario.resolution == "lowres" and scenario.variants == ("torch_fp32",) and scenario.concurrency == (1, 2)
    # --concurrency leaves the other kinds alone
    assert apply_overrides(load_scenario("end2end"), Overrides(concurrency=(4,))).concurrency == (1,)


def test_invalid_scenarios_are_rejected() -> None:
    base = {"kind": "end2end", "input": {"kind": "synthetic_ct"}}
    parse_scenario(base, "ok")
    for bad in (
        {**base, "kind": "nope"},
        {**base, "variants": ["trt_int8"]},
        {**base, "input": {"kind": "random_window"}},
        {**base, "measurement": {"percentiles": [75]}},
        {**base, "measurement": {"typo": 1}},
        {"kind": "end2end"},
    ):
        with pytest.raises(ScenarioError):
            parse_scenario(bad, "bad")


def test_plan_marks_missing_models_and_picks_the_first_available() -> None:
    ready = {ENSEMBLE, network_model_name("highres", "torch_amp"), network_model_name("highres", "torch_fp32")}
    runs = plan_runs(load_scenario("model_computation"), ready)
    assert [r.status for r in runs] == ["planned", "planned", "not available", "not available"]
    assert "segresnet_highres_trt_fp32 not loaded" in runs[2].reason
    conc = plan_runs(load_scenario("end2end_concurrency"), ready)
    assert {r.variant for r in conc} == {"torch_amp"} and [r.concurrency for r in conc] == [1, 2, 4, 8]
    assert all(r.status == "not available" for r in plan_runs(load_scenario("end2end_concurrency"), set()))


def test_command_lines() -> None:
    smoke = load_scenario("smoke")
    run = plan_runs(smoke, {ENSEMBLE, network_model_name("lowres", "torch_fp32")})[0]
    cmd = perf_analyzer_command("perf_analyzer", smoke, run, "h:1", Path("inputs/x"), csv=run.csv)
    text = " ".join(cmd)
    assert "--shape image:40,36,30" in text and "--shared-memory system" in text
    assert f"--output-shared-memory-size {40 * 36 * 30 + 4096}" in text
    assert "--request-count 2" in text and "--measurement-mode" not in text
    assert f"--bls-composing-models {network_model_name('lowres', 'torch_fp32')}" in text
    assert cmd[-3:] == ["-f", run.csv, "--verbose-csv"] and "/" not in run.csv
    mc = load_scenario("model_computation")
    run = plan_runs(mc, {network_model_name("highres", "trt_fp16")})[3]
    text = " ".join(perf_analyzer_command("perf_analyzer", mc, run, "h:1", Path("i"), csv=run.csv,
                                          metrics_url="http://h:8002/metrics", collect_metrics=True))
    assert "--measurement-mode count_windows --measurement-request-count 20 --stability-percentage 10" in text
    assert "--max-trials 10" in text and "--bls-composing-models" not in text and "--shape" not in text
    assert "--verbose-csv --collect-metrics --metrics-url http://h:8002/metrics" in text
    warmup = perf_analyzer_command("perf_analyzer", mc, run, "h:1", Path("i"), request_count=2)
    assert warmup[-2:] == ["--request-count", "2"] and "-f" not in warmup


def test_input_data_directory(tmp_path: Path) -> None:
    smoke = apply_overrides(load_scenario("smoke"), Overrides(ct_shape=(8, 7, 6)))
    folder = write_inputs(tmp_path, smoke, "torch_amp")
    assert (folder / IMAGE).stat().st_size == 8 * 7 * 6 * 4 and (folder / AFFINE).stat().st_size == 16 * 8
    assert np.fromfile(folder / AFFINE, "<f8").reshape(4, 4)[0, 0] == pytest.approx(3.0)
    assert (folder / RESOLUTION).read_text() == "lowres\n" and (folder / NETWORK).read_text() == "torch_amp\n"
    again = write_inputs(tmp_path, smoke, "torch_amp")
    assert np.array_equal(np.fromfile(again / IMAGE, "<f4"), np.fromfile(folder / IMAGE, "<f4"))
    window = write_inputs(tmp_path, load_scenario("model_computation"), "torch_fp32") / WINDOW
    assert window.stat().st_size == 96**3 * 4


# --- CSV parsing and tables on hand-written CSVs ------------------------------------------------------------
def test_csv_parsing(tmp_path: Path) -> None:
    run = fake_end2end(tmp_path, "e.csv", "torch_fp32", 5_000_000)
    (tmp_path / "unrelated_v1.other.csv").write_text(HEADER + "\n")
    assert set(composing_csvs(tmp_path, "e.csv")) == {PREPROCESS, SLIDING_WINDOW, POSTPROCESS, run.network_model}
    rows = read_pa_csv(tmp_path / "e.csv")
    assert rows[0]["Avg latency"] == 5_000_000 and rows[0]["Concurrency"] == 1
    m = measured(tmp_path, run)
    assert m.latency_us == 5_000_000 and m.compute(PREPROCESS) == 100 + 1_234_500 + 200
    # with --percentile perf_analyzer leaves out "Avg latency": the sum of the client-side parts
    no_avg = {k: v for k, v in rows[0].items() if k != "Avg latency"}
    assert avg_latency_us(no_avg) == 10 + 0 + 2 + 300 + (5_000_000 - 400) + 80 + 4


def test_latency_breakdown_table(tmp_path: Path) -> None:
    run = fake_end2end(tmp_path, "e.csv", "torch_fp32", 5_000_000)
    missing = Run("end2end", "end2end", ENSEMBLE, "lowres", "trt_fp16", 1, "x.csv", "n", status="not available",
                  reason="segresnet_lowres_trt_fp16 not loaded on the server")
    table = latency_breakdown(tmp_path, [run, missing])
    assert table.rows[0] == ["3.0 mm", "CPU", "torch_fp32 (end2end)", "2.30 GB", "5.1760", "1.2348", "3.4568",
                             "0.4568", "0 (in Inferer)", "0.1760"]
    assert table.rows[1][3] == "not available (segresnet_lowres_trt_fp16 not loaded on the server)"
    assert "| 3.0 mm | CPU |" in table.markdown("m") and "perf_analyzer -m wholebody" in table.markdown("m")


def test_speedup_table(tmp_path: Path) -> None:
    """The bundle README's A100 numbers (quoted in docs/performance.md) in, its ratios out."""
    runs = []
    for variant, infer_us in zip(SPEEDUP_VARIANTS, (88_200, 37_100, 39_200, 36_900)):
        name = f"mc-{variant}.csv"
        write_csv(tmp_path / name, HEADER, [1, 10, 0, 5, 3, 100, infer_us, 500, 0])
        network = network_model_name("highres", variant)
        runs.append(Run("model_computation", "model_computation", network, "highres", variant, 1, name, network,
                        status="ok"))
    runs.append(Run("end2end", "end2end", ENSEMBLE, "highres", "torch_fp32", 1, "e.csv", "n", status="failed",
                    reason="boom"))
    table = speedup(tmp_path, runs, "highres")
    assert table.header[:2] == ["method", "torch_fp32 (ms)"]
    assert table.rows[0] == ["model computation", "88.20", "37.10", "39.20", "36.90", "2.38", "2.25", "2.39", "1.01"]
    assert table.rows[1][:2] == ["end2end", "not available (boom)"]
    assert table.rows[1][5] == "not available (needs torch_fp32 and torch_amp)"


def test_concurrency_table(tmp_path: Path) -> None:
    runs = []
    for c in (1, 2):
        run = fake_end2end(tmp_path, f"c{c}.csv", "torch_fp32", 4_000_000 * c, queue_us=1_000_000 * (c - 1))
        run.kind, run.scenario, run.concurrency = "concurrency", "end2end_concurrency", c
        runs.append(run)
    table = concurrency(tmp_path, runs)
    assert table.header[6:9] == ["p50 latency (s)", "p95 latency (s)", "p99 latency (s)"]
    assert table.rows[1][3:6] == ["2", "0.5000", "8.0000"]
    assert table.rows[1][9:11] == ["6.0000", "0.0000"]  # (1 + 2 + 3) s of stage queues, 7 us of network queue


def test_small_parsers() -> None:
    text = 'nv_gpu_memory_used_bytes{gpu_uuid="GPU-1"} 1.5e+09\nnv_gpu_memory_used_bytes{gpu_uuid="GPU-2"} 5e8\n'
    assert gpu_memory_from_metrics(text) == 2_000_000_000
    assert gpu_memory_from_metrics("nv_inference_count 3\n") is None
    assert gpu_memory_bytes({"Max GPU Memory Usage": "GPU-a1:1000;GPU-b2:2000;"}) == 3000
    assert gpu_memory_bytes({"Max GPU Memory Usage": ""}) is None
    assert slugify("Intel(R) Xeon(R) CPU E5-2690 v4 @ 2.60GHz") == "intel-xeon-e5-2690-v4"


# --- the real thing -------------------------------------------------------------------------------------------
def _row(path: Path, first: str) -> list[str]:
    with open(path, newline="") as f:
        return next(r for r in csv.reader(f) if r and r[0].startswith(first))


def test_host_memory_counts_a_shared_memory_file_once() -> None:
    before = host_memory_bytes([os.getpid()])
    region = shared_memory.SharedMemory(create=True, size=64 * 2**20)
    try:
        region.buf[:] = b"\x01" * region.size  # resident now
        second_mapping = shared_memory.SharedMemory(name=region.name)  # the same file mapped again
        grown = host_memory_bytes([os.getpid()]) - before
        second_mapping.close()
    finally:
        region.close()
        region.unlink()
    assert 64 * 2**20 <= grown < 96 * 2**20


@pytest.mark.parametrize("layout", sorted({layout for layout, _ in SETTINGS.values()}))
def test_network_forward_times_each_forward(test_bundle: Path, layout: str) -> None:
    result = run_child(test_bundle, "lowres", layout, huge_pages=False, forwards=2)
    assert len(result["seconds"]) == len(result["faults"]) == len(result["peak_gb"]) == 2
    assert all(s > 0 for s in result["seconds"])
    assert min(result["peak_gb"]) >= result["loaded_gb"][0] > 0


def test_perf_against_a_real_server(server: LocalTritonServer, tmp_path: Path) -> None:
    assert server.process is not None
    argv = ["smoke", "model_computation", "-u", server.grpc_url, "--server-pid", str(server.process.pid),
            "--resolution", "lowres", "--variants", "torch_fp32,trt_fp16", "--requests", "1",
            "--warmup-requests", "0", "--out", str(tmp_path), "--machine", "test"]
    assert perf_main(argv) == 0
    out = tmp_path / "test"
    raw = out / "raw"
    manifest = json.loads((raw / "manifest.json").read_text())
    runs = {(r["scenario"], r["variant"]): Run.from_json(r) for r in manifest["runs"]}
    smoke = runs[("smoke", "torch_fp32")]
    assert smoke.status == "ok" and smoke.peak_host_bytes and smoke.write_s is not None
    assert runs[("smoke", "trt_fp16")].status == "not available"

    # numbers parsed from perf_analyzer's own CSVs appear in the rendered tables
    top = read_pa_csv(raw / smoke.csv)[0]
    stages = {m: read_pa_csv(p)[0] for m, p in composing_csvs(raw, smoke.csv).items()}
    # the CPU default runs the network inside the sliding-window stage: no composing network model
    assert smoke.network_in_process and set(stages) == {PREPROCESS, SLIDING_WINDOW, POSTPROCESS}
    compute = {m: sum(float(r[c]) for c in ("Server Compute Input", "Server Compute Infer", "Server Compute Output"))
               for m, r in stages.items()}
    row = _row(out / "latency_breakdown.csv", "3.0 mm")
    assert row[4:8] == [seconds(float(top["Avg latency"]) + smoke.write_s * 1e6), seconds(compute[PREPROCESS]),
                        seconds(compute[SLIDING_WINDOW]), seconds(compute[POSTPROCESS])]
    mc = runs[("model_computation", "torch_fp32")]
    infer = float(read_pa_csv(raw / mc.csv)[0]["Server Compute Infer"])
    speed = _row(out / "speedup_lowres.csv", "model computation")
    assert speed[1] == millis(infer)
    assert speed[4] == "not available (segresnet_lowres_trt_fp16 not loaded on the server)"
    assert _row(out / "speedup_lowres.csv", "end2end (smoke)")[1] == millis(float(top["Avg latency"]))
    md = (out / "tables.md").read_text()
    assert millis(infer) in md and seconds(compute[SLIDING_WINDOW]) in md and "Triton 2.51.0" in md
    assert f"-f {smoke.csv}" in md

    # re-rendering from raw/ alone gives the same tables
    before = (out / "tables.md").read_text()
    assert perf_main(["--render-only", "--out", str(tmp_path), "--machine", "test"]) == 0
    assert (out / "tables.md").read_text() == before
