"""Reproduce the bundle README's benchmark tables with perf_analyzer against a Triton server.

Each scenario (perf/scenarios/<name>.toml) becomes perf_analyzer runs; their CSVs are kept under
perf/results/<machine>/raw/ and rendered into perf/results/<machine>/tables.md and one CSV per table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from perf.run import (
    MemorySampler,
    clear_csvs,
    machine_info,
    run_perf_analyzer,
    server_info,
    time_label_map_write,
)
from perf.scenarios import (
    SCENARIO_DIR,
    Overrides,
    Run,
    Scenario,
    ScenarioError,
    apply_overrides,
    available_scenarios,
    load_scenario,
    perf_analyzer_command,
    plan_runs,
    write_inputs,
)
from perf.tables import measured, write_tables
from wholebody.contract import MODEL_REPOSITORY, REPO_ROOT, RESOLUTIONS, SLIDING_WINDOW, VARIANTS

log = logging.getLogger("perf")

DEFAULT_SCENARIOS = ["model_computation", "end2end", "end2end_concurrency"]
RESULTS = REPO_ROOT / "perf" / "results"

EPILOG = f"""\
scenarios (perf/scenarios/*.toml): {', '.join(available_scenarios())}

examples:
  # GPU box, server already running (trt_* exported with `python -m export`): the full scenarios
  python -m perf -u localhost:8001 --metrics-url http://localhost:8002/metrics

  # CPU box, start a local server on the repository, small counts (~15 min on 2 cores)
  python -m perf --start-server --resolution lowres --variants torch_fp32,torch_amp \\
      --requests 2 --concurrency 1,2

  # a quick check of a deployment
  python -m perf smoke -u localhost:8001

  # re-render tables.md from the CSVs already under perf/results/<machine>/raw/
  python -m perf --render-only
"""


def _shape(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.replace("x", ",").split(",")]
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected X,Y,Z, got {text!r}")
    return parts[0], parts[1], parts[2]


def _spacing(text: str) -> tuple[float, float, float]:
    parts = [float(p) for p in text.replace("x", ",").split(",")]
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected SX,SY,SZ in mm, got {text!r}")
    return parts[0], parts[1], parts[2]


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"values must be > 0, got {text!r}")
    return values


def _variants(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in VARIANTS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m perf",
        description=__doc__.split("\n\n")[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help=f"scenario names or .toml paths (default: {' '.join(DEFAULT_SCENARIOS)})")
    server = p.add_argument_group("server")
    server.add_argument("-u", "--url", default="localhost:8001", help="Triton gRPC endpoint (default: %(default)s)")
    server.add_argument("--metrics-url", help="Triton metrics endpoint, for GPU memory and --collect-metrics "
                        "(default with a local GPU: http://<url host>:8002/metrics)")
    server.add_argument("--server-pid", type=int,
                        help="pid of a local tritonserver: the peak memory of its process group is reported")
    server.add_argument("--start-server", action="store_true", help="start a local tritonserver for the run")
    server.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY,
                        help="with --start-server (default: the repository's, %(default)s)")
    server.add_argument("--config-name", default=None,
                        help="with --start-server: per-model config configs/NAME.pbtxt ('' = config.pbtxt; "
                        "default: cpu without a GPU, config.pbtxt with one)")
    sizes = p.add_argument_group("overrides of the scenario files")
    sizes.add_argument("--ct-shape", type=_shape, help="synthetic CT size X,Y,Z (e.g. 512,512,397)")
    sizes.add_argument("--ct-spacing", type=_spacing, help="synthetic CT voxel size in mm (e.g. 0.84,0.84,1.5)")
    sizes.add_argument("--requests", type=int,
                       help="exactly N requests per run (perf_analyzer --request-count), instead of "
                       "measurement windows until stable")
    sizes.add_argument("--warmup-requests", type=int, help="requests sent and discarded before each run")
    sizes.add_argument("--resolution", choices=sorted(RESOLUTIONS))
    sizes.add_argument("--variants", type=_variants, help=f"comma-separated, from {','.join(VARIANTS)}")
    sizes.add_argument("--concurrency", type=_ints, help="levels of the concurrency scenarios, e.g. 1,2,4,8")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=RESULTS, help="results root (default: %(default)s)")
    out.add_argument("--machine", help="results folder name (default: a slug of the GPU or CPU model)")
    out.add_argument("--scenario-dir", type=Path, default=SCENARIO_DIR, help=argparse.SUPPRESS)
    out.add_argument("--fresh", action="store_true", help="forget earlier runs of this machine's results")
    out.add_argument("--render-only", action="store_true", help="only re-render the tables from raw/")
    out.add_argument("--note", action="append", default=[],
                     help="a line for the top of tables.md, e.g. which weights the server had (repeatable)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def load_manifest(path: Path) -> dict[str, Any]:
    if path.exists():
        return json.loads(path.read_text())
    return {"runs": []}


def merge_runs(old: list[dict[str, Any]], new: list[Run]) -> list[dict[str, Any]]:
    """Earlier runs, with those measured again replaced by the new ones."""
    keys = {r.key for r in new}
    kept = [r for r in old if Run.from_json(r).key not in keys]
    return kept + [r.to_json() for r in new]


def execute(
    scenario: Scenario, run: Run, *, raw: Path, binary: Path, url: str, sampler: MemorySampler,
    metrics_url: str | None, collect_metrics: bool,
) -> None:
    """One perf_analyzer run (after its warm-up), its memory peaks and, for end2end, the write time."""
    data_dir = write_inputs(raw / "inputs", scenario, run.variant).relative_to(raw)
    stem = run.csv.removesuffix(".csv")
    warmup = scenario.measurement.warmup_requests
    if warmup > 0:
        cmd = perf_analyzer_command("perf_analyzer", scenario, run, url, data_dir, request_count=warmup)
        log.info("    warm-up: %d request(s)", max(warmup, run.concurrency))
        rc, output = run_perf_analyzer(cmd, binary, raw, raw / f"{stem}.warmup.log")
        if rc != 0:
            run.status, run.reason = "failed", f"warm-up: {_last_error(output)}"
            log.error("    warm-up failed (see %s): %s", raw / f"{stem}.warmup.log", run.reason)
            return
    run.command = perf_analyzer_command(
        "perf_analyzer", scenario, run, url, data_dir, csv=run.csv,
        metrics_url=metrics_url, collect_metrics=collect_metrics,
    )
    clear_csvs(raw, run.csv)
    log.info("    perf_analyzer (output: %s)", raw / f"{stem}.log")
    started = time.monotonic()
    with sampler:
        rc, output = run_perf_analyzer(run.command, binary, raw, raw / f"{stem}.log")
    run.wall_s = round(time.monotonic() - started, 1)
    run.peak_host_bytes, run.peak_gpu_bytes = sampler.peak_host, sampler.peak_gpu
    if rc != 0 or not (raw / run.csv).exists():
        run.status, run.reason = "failed", _last_error(output)
        log.error("    failed after %.0f s (exit %d): %s", run.wall_s, rc, run.reason)
        return
    run.status = "ok"
    if scenario.kind == "end2end":
        run.label_map_shape = list(scenario.input.shape)
        run.write_s = time_label_map_write(raw / data_dir, scenario.input.shape)
    m = measured(raw, run)
    log.info("    done in %.0f s: throughput %.3g infer/s, avg latency %.3f s", run.wall_s,
             float(m.top["Inferences/Second"]), m.latency_us / 1e6)


def _without_notes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            out.append(arg)
    return out


def _last_error(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return (errors or lines or ["no output"])[-1][:300]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    machine = machine_info()
    out = Path(args.out) / (args.machine or machine["slug"])
    raw = out / "raw"
    manifest_path = raw / "manifest.json"
    if args.render_only:
        if not manifest_path.exists():
            log.error("nothing to render: %s does not exist", manifest_path)
            return 2
        manifest = load_manifest(manifest_path)
        if args.note:
            manifest["notes"] = args.note
            manifest_path.write_text(json.dumps(manifest, indent=1))
        log.info("wrote %s", write_tables(out, manifest))
        return 0
    overrides = Overrides(
        ct_shape=args.ct_shape, ct_spacing=args.ct_spacing, requests=args.requests, resolution=args.resolution,
        variants=args.variants, concurrency=args.concurrency, warmup_requests=args.warmup_requests,
    )
    try:
        scenarios = [apply_overrides(load_scenario(s, args.scenario_dir), overrides)
                     for s in (args.scenarios or DEFAULT_SCENARIOS)]
    except ScenarioError as exc:
        log.error("%s", exc)
        return 2
    raw.mkdir(parents=True, exist_ok=True)
    manifest = {"runs": []} if args.fresh else load_manifest(manifest_path)
    if args.note:
        manifest["notes"] = args.note
    has_gpu = bool(machine["gpus"])

    with contextlib.ExitStack() as stack:
        from wholebody.triton_server import LocalTritonServer
        from wholebody.triton_server.perf_analyzer import install_perf_analyzer

        binary = install_perf_analyzer()
        url, metrics_url, server_pid = args.url, args.metrics_url, args.server_pid
        if args.start_server:
            config = args.config_name if args.config_name is not None else ("" if has_gpu else "cpu")
            server = LocalTritonServer(
                model_repository=args.model_repository, config_name=config or None,
                extra_args=["--allow-gpu-metrics=true"] if has_gpu else [],
            )
            log.info("starting tritonserver on %s (%s configs)", args.model_repository, config or "default")
            stack.enter_context(server)
            assert server.process is not None
            url, server_pid = server.grpc_url, server.process.pid
            metrics_url = metrics_url or (server.metrics_url if has_gpu else None)
        elif has_gpu and not metrics_url:
            metrics_url = f"http://{url.rsplit(':', 1)[0]}:8002/metrics"
        info = server_info(url)
        log.info("Triton %s at %s: %d models ready", info["triton_version"], url, len(info["models"]))
        sampler = MemorySampler(server_pid=server_pid, metrics_url=metrics_url, use_nvidia_smi=has_gpu)
        if server_pid is None and not has_gpu:
            log.warning("memory not measured: pass --server-pid PID of a local server, or --start-server")
        done: list[Run] = []
        for i, scenario in enumerate(scenarios, 1):
            in_process = info["models"].get(SLIDING_WINDOW, {}).get("placement") == "in_process"
            runs = plan_runs(scenario, set(info["models"]), in_process=in_process)
            log.info("[%d/%d] %s (%s, %s): %d run(s)", i, len(scenarios), scenario.name, scenario.resolution,
                     scenario.description or scenario.kind, len(runs))
            for j, run in enumerate(runs, 1):
                where = SLIDING_WINDOW if run.network_in_process else run.network_model
                run.device = info["models"].get(where, {}).get("device", "")
                log.info("  (%d/%d) %s %s, concurrency %d", j, len(runs), run.model, run.variant, run.concurrency)
                if run.status == "not available":
                    log.info("    skipped: %s", run.reason)
                else:
                    execute(scenario, run, raw=raw, binary=binary, url=url, sampler=sampler,
                            metrics_url=metrics_url, collect_metrics=has_gpu and metrics_url is not None)
                done.append(run)
                manifest.update(machine=machine, server=info, runs=merge_runs(manifest["runs"], [run]))
                invocations = manifest.setdefault("invocations", [])
                line = shlex.join(["python", "-m", "perf", *_without_notes(argv)])
                if line not in invocations:
                    invocations.append(line)
                manifest["invocation"] = "\n".join(invocations)
                manifest_path.write_text(json.dumps(manifest, indent=1))
        if args.start_server and server.process is not None and server.process.poll() is not None:
            log.error("the local tritonserver exited during the run (log: %s)", server.log_path)
    path = write_tables(out, manifest)
    log.info("wrote %s", path)
    failed = [r for r in done if r.status == "failed"]
    for run in failed:
        log.error("failed: %s %s c%d: %s", run.scenario, run.variant, run.concurrency, run.reason)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
