"""Benchmark scenarios: the TOML files of perf/scenarios/, their input data, and perf_analyzer command lines.

A scenario file says what to measure and how; `load_scenario` reads it and `apply_overrides` lets the
command line shrink it (a smaller CT, fewer requests, one resolution, some variants) so that a CPU box
finishes in minutes while a GPU box runs the files unchanged. Everything here is a pure function of its
arguments except `write_inputs`, which writes the input files perf_analyzer reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from wholebody.atomic import atomic_write_bytes
from wholebody.contract import (
    AFFINE,
    ENSEMBLE,
    IMAGE,
    IN_CHANNELS,
    NETWORK,
    RESOLUTION,
    RESOLUTIONS,
    ROI_SIZE,
    TORCH_VARIANTS,
    VARIANTS,
    WINDOW,
    network_model_name,
)

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
KINDS = ("model_computation", "end2end", "concurrency")
INPUT_KINDS = ("random_window", "synthetic_ct")
# The latency percentiles perf_analyzer 2.51 always writes to its CSV.
CSV_PERCENTILES = (50, 90, 95, 99)


class ScenarioError(ValueError):
    """A scenario file or an override is invalid; the message says which field and why."""


@dataclass(frozen=True)
class InputSpec:
    kind: str  # "random_window" or "synthetic_ct"
    seed: int = 0
    shape: tuple[int, int, int] = (512, 512, 397)  # synthetic_ct only
    spacing: tuple[float, float, float] = (0.84, 0.84, 1.5)  # synthetic_ct only

    @property
    def key(self) -> str:
        """A folder name that changes whenever the data would."""
        if self.kind == "random_window":
            return f"window-{'x'.join(map(str, ROI_SIZE))}-seed{self.seed}"
        shape = "x".join(map(str, self.shape))
        spacing = "x".join(f"{s:g}" for s in self.spacing)
        return f"ct-{shape}-{spacing}mm-seed{self.seed}"


@dataclass(frozen=True)
class Measurement:
    mode: str = "count_windows"
    measurement_request_count: int = 10  # requests per window (count_windows)
    stability_percentage: float = 10.0
    max_trials: int = 10
    request_count: int = 0  # > 0: exactly this many requests per concurrency level, one window, no stability search
    warmup_requests: int = 0  # requests sent (and discarded) before the measurement
    stability_percentile: int | None = None  # None: perf_analyzer stabilises on the average latency
    percentiles: tuple[int, ...] = (50, 95, 99)  # reported in the tables


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    kind: str
    resolution: str
    variants: tuple[str, ...]
    input: InputSpec
    measurement: Measurement
    concurrency: tuple[int, ...] = (1,)
    first_available_variant: bool = False  # measure only the first variant the server has
    shared_memory: str = "system"
    protocol: str = "grpc"
    source: str = ""  # the file it came from


@dataclass(frozen=True)
class Overrides:
    """Command-line overrides; None leaves the scenario's value."""

    ct_shape: tuple[int, int, int] | None = None
    ct_spacing: tuple[float, float, float] | None = None
    requests: int | None = None
    resolution: str | None = None
    variants: tuple[str, ...] | None = None
    concurrency: tuple[int, ...] | None = None
    warmup_requests: int | None = None


@dataclass
class Run:
    """One perf_analyzer invocation (or a skipped one, with the reason) and what it produced."""

    scenario: str
    kind: str
    model: str  # perf_analyzer's -m
    resolution: str
    variant: str
    concurrency: int
    csv: str  # file name in the raw folder
    network_model: str
    device: str = ""  # where the network model runs: CPU or GPU (from its config on the server)
    network_in_process: bool = False  # run inside sliding_window (its `placement: in_process`), not by BLS
    command: list[str] = field(default_factory=list)
    status: str = "planned"  # planned | ok | failed | not available
    reason: str = ""
    percentiles: list[int] = field(default_factory=list)
    peak_host_bytes: int | None = None
    peak_gpu_bytes: int | None = None
    write_s: float | None = None
    label_map_shape: list[int] | None = None
    wall_s: float | None = None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.scenario, self.resolution, self.variant, self.concurrency)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def _ints(value: Any, what: str, length: int | None = None) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ScenarioError(f"{what}: expected a list of integers, got {value!r}") from exc
    if length is not None and len(out) != length:
        raise ScenarioError(f"{what}: expected {length} values, got {len(out)}")
    if any(v <= 0 for v in out):
        raise ScenarioError(f"{what}: values must be > 0, got {list(out)}")
    return out


def _check_variants(variants: tuple[str, ...], what: str) -> tuple[str, ...]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ScenarioError(f"{what}: {unknown or 'empty'}; choose from {list(VARIANTS)}")
    return variants


def parse_scenario(data: dict[str, Any], name: str, source: str = "") -> Scenario:
    """A Scenario from the parsed TOML of a scenario file (see perf/scenarios/*.toml)."""
    where = source or name
    try:
        kind = data["kind"]
        inp = dict(data["input"])
        meas = dict(data.get("measurement", {}))
    except KeyError as exc:
        raise ScenarioError(f"{where}: missing required key {exc}") from exc
    if kind not in KINDS:
        raise ScenarioError(f"{where}: kind {kind!r}; choose from {list(KINDS)}")
    if inp.get("kind") not in INPUT_KINDS:
        raise ScenarioError(f"{where}: input.kind {inp.get('kind')!r}; choose from {list(INPUT_KINDS)}")
    if kind == "model_computation" and inp["kind"] != "random_window":
        raise ScenarioError(f"{where}: a model_computation scenario takes input.kind = 'random_window'")
    if kind != "model_computation" and inp["kind"] != "synthetic_ct":
        raise ScenarioError(f"{where}: a {kind} scenario takes input.kind = 'synthetic_ct'")
    spec = InputSpec(
        kind=inp["kind"],
        seed=int(inp.get("seed", 0)),
        shape=_ints(inp.get("shape", InputSpec.shape), f"{where}: input.shape", 3),
        spacing=tuple(float(s) for s in inp.get("spacing", InputSpec.spacing)),  # type: ignore[arg-type]
    )
    percentiles = _ints(meas.pop("percentiles", Measurement.percentiles), f"{where}: measurement.percentiles")
    if set(percentiles) - set(CSV_PERCENTILES):
        raise ScenarioError(
            f"{where}: measurement.percentiles must be among {list(CSV_PERCENTILES)} (perf_analyzer's CSV)"
        )
    known = {f.name for f in dataclasses.fields(Measurement)} - {"percentiles"}
    if set(meas) - known:
        raise ScenarioError(f"{where}: unknown measurement keys {sorted(set(meas) - known)}")
    measurement = Measurement(percentiles=percentiles, **meas)
    if measurement.mode not in ("count_windows", "time_windows"):
        raise ScenarioError(f"{where}: measurement.mode must be count_windows or time_windows")
    resolution = data.get("resolution", "highres")
    if resolution not in RESOLUTIONS:
        raise ScenarioError(f"{where}: resolution {resolution!r}; choose from {sorted(RESOLUTIONS)}")
    shared_memory = data.get("shared_memory", "system")
    if shared_memory not in ("system", "none"):
        raise ScenarioError(f"{where}: shared_memory must be 'system' or 'none' (cuda needs a GPU client)")
    return Scenario(
        name=name,
        description=str(data.get("description", "")).strip(),
        kind=kind,
        resolution=resolution,
        variants=_check_variants(tuple(data.get("variants", VARIANTS)), f"{where}: variants"),
        input=spec,
        measurement=measurement,
        concurrency=_ints(data.get("concurrency", [1]), f"{where}: concurrency"),
        first_available_variant=bool(data.get("first_available_variant", False)),
        shared_memory=shared_memory,
        protocol=data.get("protocol", "grpc"),
        source=source,
    )


def available_scenarios(directory: Path = SCENARIO_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.toml"))


def load_scenario(name_or_path: str, directory: Path = SCENARIO_DIR) -> Scenario:
    """Load `perf/scenarios/<name>.toml`, or a scenario file given by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = Path(directory) / f"{name_or_path}.toml"
    if not path.exists():
        raise ScenarioError(f"no scenario {name_or_path!r}; available: {available_scenarios(directory)}")
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ScenarioError(f"{path}: {exc}") from exc
    return parse_scenario(data, path.stem, str(path))


def apply_overrides(scenario: Scenario, o: Overrides) -> Scenario:
    """The scenario with the command line's overrides applied (sizes only ever come from here or the file)."""
    spec = scenario.input
    if spec.kind == "synthetic_ct":
        spec = dataclasses.replace(spec, shape=o.ct_shape or spec.shape, spacing=o.ct_spacing or spec.spacing)
    m = scenario.measurement
    if o.requests is not None:
        m = dataclasses.replace(m, request_count=o.requests)
    if o.warmup_requests is not None:
        m = dataclasses.replace(m, warmup_requests=o.warmup_requests)
    concurrency = scenario.concurrency
    if o.concurrency is not None and scenario.kind == "concurrency":
        concurrency = o.concurrency
    variants = scenario.variants
    if o.variants is not None:
        variants = _check_variants(o.variants, "--variants")
    return dataclasses.replace(
        scenario,
        input=spec,
        measurement=m,
        concurrency=concurrency,
        variants=variants,
        resolution=o.resolution or scenario.resolution,
    )


def run_name(scenario: Scenario, variant: str, concurrency: int) -> str:
    """Base name of a run's CSV (perf_analyzer names the composing models' CSVs `<model>_v<n>.<this>`)."""
    return f"{scenario.name}-{scenario.resolution}-{variant}-c{concurrency}.csv"


def plan_runs(scenario: Scenario, ready_models: set[str], in_process: bool = False) -> list[Run]:
    """The runs of a scenario: one per variant and concurrency; variants the server lacks are 'not available'.

    `in_process`: the server's sliding_window runs torch networks itself (`placement: in_process`),
    so an end2end run of a torch variant needs no network model loaded.
    """
    runs: list[Run] = []
    found_one = False
    for variant in scenario.variants:
        network = network_model_name(scenario.resolution, variant)
        model = network if scenario.kind == "model_computation" else ENSEMBLE
        inside = in_process and model == ENSEMBLE and variant in TORCH_VARIANTS
        needed = [model] if inside else [model, network]
        missing = [m for m in dict.fromkeys(needed) if m not in ready_models]
        if scenario.first_available_variant and (found_one or missing):
            continue
        found_one = found_one or not missing
        for concurrency in scenario.concurrency:
            run = Run(
                scenario=scenario.name,
                kind=scenario.kind,
                model=model,
                resolution=scenario.resolution,
                variant=variant,
                concurrency=concurrency,
                csv=run_name(scenario, variant, concurrency),
                network_model=network,
                network_in_process=inside,
                percentiles=list(scenario.measurement.percentiles),
            )
            if missing:
                run.status, run.reason = "not available", f"{', '.join(missing)} not loaded on the server"
            runs.append(run)
    if scenario.first_available_variant and not found_one:
        variant = scenario.variants[0]
        names = ", ".join(network_model_name(scenario.resolution, v) for v in scenario.variants)
        for concurrency in scenario.concurrency:
            runs.append(
                Run(scenario.name, scenario.kind, ENSEMBLE, scenario.resolution, variant, concurrency,
                    run_name(scenario, variant, concurrency), network_model_name(scenario.resolution, variant),
                    status="not available", reason=f"none of {names} is loaded on the server")
            )
    return runs


def input_dir(inputs_root: Path, scenario: Scenario, variant: str) -> Path:
    """The --input-data folder of one run: raw files named after the inputs (see write_inputs)."""
    if scenario.kind == "model_computation":
        return Path(inputs_root) / scenario.input.key
    return Path(inputs_root) / f"{scenario.input.key}-{scenario.resolution}-{variant}"


def write_inputs(inputs_root: Path, scenario: Scenario, variant: str) -> Path:
    """Write (once) the data of one run as perf_analyzer's --input-data directory and return it.

    perf_analyzer 2.51 reads one file per model input, named after the input: raw little-endian bytes
    in row-major order for numeric tensors, and for BYTES tensors a text file with one string per line
    (no length prefix). Every input needs a file, the optional ones included. Variable dimensions come
    from --shape. Big tensors as raw files avoid a JSON file of ~1 GB text for a 512x512x397 CT.
    """
    spec = scenario.input
    folder = input_dir(inputs_root, scenario, variant)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.kind == "random_window":
        path = folder / WINDOW
        if not path.exists() or path.stat().st_size != 4 * IN_CHANNELS * int(np.prod(ROI_SIZE)):
            window = np.random.default_rng(spec.seed).standard_normal((IN_CHANNELS, *ROI_SIZE), dtype=np.float32)
            atomic_write_bytes(path, window.tobytes())
        return folder
    ct = Path(inputs_root) / spec.key
    ct.mkdir(parents=True, exist_ok=True)
    if not (ct / IMAGE).exists() or (ct / IMAGE).stat().st_size != 4 * int(np.prod(spec.shape)):
        from wholebody.sample_data import synthetic_ct

        image = synthetic_ct(spec.shape, spec.spacing, seed=spec.seed)
        atomic_write_bytes(ct / AFFINE, np.ascontiguousarray(image.affine, dtype="<f8").tobytes())
        atomic_write_bytes(ct / IMAGE, np.ascontiguousarray(np.asarray(image.dataobj), dtype="<f4").tobytes())
    for name in (IMAGE, AFFINE):
        link = folder / name
        if not link.exists():
            link.symlink_to(Path("..") / ct.name / name)
    (folder / RESOLUTION).write_text(scenario.resolution + "\n")
    (folder / NETWORK).write_text(variant + "\n")
    return folder


def perf_analyzer_command(
    binary: str,
    scenario: Scenario,
    run: Run,
    url: str,
    data_dir: Path,
    *,
    metrics_url: str | None = None,
    collect_metrics: bool = False,
    request_count: int | None = None,
    csv: str | None = None,
) -> list[str]:
    """The perf_analyzer command line of one run (with `request_count`, a warm-up of that many requests).

    `csv` must be a bare file name (run it with the raw folder as working directory): perf_analyzer 2.51
    writes the composing models' CSVs as `<model>_v<version>.<csv>` and writes none of them when `-f`
    holds a directory.
    """
    m = scenario.measurement
    cmd = [binary, "-m", run.model, "-u", url, "-i", scenario.protocol, "--input-data", str(data_dir)]
    if scenario.input.kind == "synthetic_ct":
        cmd += ["--shape", f"{IMAGE}:{','.join(map(str, scenario.input.shape))}"]
    if scenario.shared_memory != "none":
        cmd += ["--shared-memory", scenario.shared_memory]
        if scenario.input.kind == "synthetic_ct":  # label_map is UINT8 of the input's shape (variable dims)
            cmd += ["--output-shared-memory-size", str(int(np.prod(scenario.input.shape)) + 4096)]
    cmd += ["--concurrency-range", str(run.concurrency)]
    if request_count is not None:
        return cmd + ["--request-count", str(max(request_count, run.concurrency))]
    if m.request_count > 0:
        cmd += ["--request-count", str(max(m.request_count, run.concurrency))]
    else:
        cmd += ["--measurement-mode", m.mode]
        if m.mode == "count_windows":
            cmd += ["--measurement-request-count", str(max(m.measurement_request_count, run.concurrency))]
        cmd += ["--stability-percentage", f"{m.stability_percentage:g}", "--max-trials", str(m.max_trials)]
        if m.stability_percentile is not None:
            cmd += ["--percentile", str(m.stability_percentile)]
    if run.kind != "model_computation" and not run.network_in_process:
        cmd += ["--bls-composing-models", run.network_model]
    if csv:
        cmd += ["-f", csv, "--verbose-csv"]  # without --verbose-csv the CSV has no "Avg latency" column
        if collect_metrics and metrics_url:
            cmd += ["--collect-metrics", "--metrics-url", metrics_url]
    return cmd
