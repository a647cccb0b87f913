"""perf_analyzer CSVs -> the bundle README's tables (Markdown and CSV). Every number comes from a CSV.

perf_analyzer 2.51's `-f X.csv` writes one row per concurrency level, times in microseconds:
`Concurrency, Inferences/Second, Client Send, Network+Server Send/Recv, Server Queue, Server Compute Input,
Server Compute Infer, Server Compute Output, Client Recv, p50/p90/p95/p99 latency[, Avg latency], ...`
(no `Avg latency` when --percentile is given), and for an ensemble (and each --bls-composing-models
model) a file `<model>_v<version>.X.csv` with the same server-side columns for that model alone.
"""

from __future__ import annotations

import csv
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from perf.scenarios import Run
from wholebody.contract import POSTPROCESS, PREPROCESS, RESOLUTIONS, SLIDING_WINDOW

CLIENT_PARTS = (
    "Client Send", "Network+Server Send/Recv", "Server Queue", "Server Compute Input",
    "Server Compute Infer", "Server Compute Output", "Client Recv",
)
COMPUTE = ("Server Compute Input", "Server Compute Infer", "Server Compute Output")


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def read_pa_csv(path: Path) -> list[dict[str, float | str]]:
    """The rows of a perf_analyzer CSV, numbers as floats (keys are the header's column names)."""
    with open(path, newline="") as f:
        return [{k.strip(): _number(v.strip()) for k, v in row.items() if k} for row in csv.DictReader(f)]


def composing_csvs(raw: Path, csv_name: str) -> dict[str, Path]:
    """{model: path} of the `<model>_v<version>.<csv_name>` files next to `csv_name`."""
    pattern = re.compile(rf"^(?P<model>.+)_v\d+\.{re.escape(csv_name)}$")
    found = {}
    for path in sorted(Path(raw).glob(f"*_v*.{csv_name}")):
        match = pattern.match(path.name)
        if match:
            found[match["model"]] = path
    return found


def avg_latency_us(row: dict[str, Any]) -> float:
    """The client's average latency; without that column (--percentile runs) the sum of its parts."""
    if isinstance(row.get("Avg latency"), float):
        return float(row["Avg latency"])
    return float(sum(float(row[c]) for c in CLIENT_PARTS))


def gpu_memory_bytes(row: dict[str, Any]) -> int | None:
    """`Max GPU Memory Usage` of a --collect-metrics CSV ("<gpu uuid>:<bytes>;" per GPU), summed over GPUs."""
    cell = row.get("Max GPU Memory Usage")
    if not isinstance(cell, str) or ":" not in cell:
        return None
    return int(sum(float(part.rsplit(":", 1)[1]) for part in cell.split(";") if ":" in part))


def compute_us(row: dict[str, Any]) -> float:
    return float(sum(float(row[c]) for c in COMPUTE))


@dataclass
class Measured:
    """What the tables need from one run's CSVs (one concurrency level per file), in microseconds."""

    top: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def latency_us(self) -> float:
        return avg_latency_us(self.top)

    def compute(self, model: str) -> float:
        return compute_us(self.models[model])


def measured(raw: Path, run: Run) -> Measured:
    rows = read_pa_csv(Path(raw) / run.csv)
    if not rows:
        raise ValueError(f"{run.csv} has no rows")
    models = {}
    for model, path in composing_csvs(raw, run.csv).items():
        model_rows = read_pa_csv(path)
        if model_rows:
            models[model] = model_rows[0]
    models.setdefault(run.model, rows[0])  # a network model measured alone has no composing CSVs
    return Measured(rows[0], models)


# --- formatting ------------------------------------------------------------------------------------
def seconds(us: float) -> str:
    return f"{us / 1e6:.4f}"


def millis(us: float) -> str:
    return f"{us / 1e3:.2f}"


def gigabytes(n: int | None) -> str:
    return f"{n / 1e9:.2f} GB" if n else "not measured"


def resolution_label(resolution: str) -> str:
    return f"{RESOLUTIONS[resolution].pixdim[0]:.1f} mm"


@dataclass
class Table:
    name: str  # file stem of its CSV
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)

    def markdown(self, machine_line: str) -> str:
        lines = [f"### {self.title}", "", f"Machine: {machine_line}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "---|" * len(self.header))
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        if self.commands:
            lines += ["", "perf_analyzer command lines (run in the raw/ folder next to this file):", "", "```"]
            lines += self.commands + ["```"]
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.header)
            writer.writerows(self.rows)


def memory(run: Run, m: Measured) -> str:
    """GPU runs: perf_analyzer's `Max GPU Memory Usage`, else our sampled peak; CPU runs: the server's peak host memory."""
    if run.device == "GPU":
        return gigabytes(gpu_memory_bytes(m.top) or run.peak_gpu_bytes)
    return gigabytes(run.peak_host_bytes)


def _command(run: Run) -> str:
    return shlex.join(run.command)


def _unavailable(run: Run) -> str:
    return f"not available ({run.reason})" if run.reason else f"not available ({run.status})"


# --- the tables ------------------------------------------------------------------------------------
def latency_breakdown(raw: Path, runs: list[Run]) -> Table:
    """The README's first table: one row per resolution, device and network variant of the end2end runs."""
    header = ["model", "device", "network", "memory", "Total", "Pre", "Inferer", "Invert", "Post", "Write (s)"]
    rows, commands = [], []
    for run in runs:
        if run.kind != "end2end" or run.concurrency != 1:
            continue
        label = [resolution_label(run.resolution), run.device or "n/a", f"{run.variant} ({run.scenario})"]
        if run.status != "ok":
            rows.append(label + [_unavailable(run)] + [""] * 6)
            continue
        m = measured(raw, run)
        write_us = (run.write_s or 0.0) * 1e6
        rows.append(label + [
            memory(run, m),
            seconds(m.latency_us + write_us),
            seconds(m.compute(PREPROCESS)),
            seconds(m.compute(SLIDING_WINDOW)),
            seconds(m.compute(POSTPROCESS)),
            "0 (in Inferer)",
            f"{run.write_s:.4f}" if run.write_s is not None else "not measured",
        ])
        commands.append(_command(run))
    notes = [
        "Total = perf_analyzer's client average latency (CT sent, label map received, through system shared "
        "memory) + Write.",
        f"Pre = `{PREPROCESS}` compute (input + infer + output) from its composing-model CSV: orientation, "
        "resampling, intensity normalisation.",
        f"Inferer = `{SLIDING_WINDOW}` compute: the sliding window including the network (its BLS calls into the "
        "network model, or the network run in-process), the gaussian blending, and the argmax.",
        f"Invert = `{POSTPROCESS}` compute: nearest resampling back to the input grid (the bundle's Invertd).",
        "Post = 0: argmax is fused into the sliding window stage, so it is included in Inferer (the README's Post "
        "also held softmax, argmax and inversion).",
        "Write = median client-side time of writing the label map of the input's size as .nii.gz with nibabel "
        "(client.segmentation_client.write_label_map), timed by `python -m perf`.",
        "memory = on GPU, the peak GPU memory in use: perf_analyzer's `Max GPU Memory Usage` (--collect-metrics), "
        "else sampled from Triton's nv_gpu_memory_used_bytes or nvidia-smi; on CPU the "
        "peak host memory of the tritonserver process group (server + Python backend stubs): their private memory "
        "(RssAnon) plus every shared-memory file they map, counted once (perf.run.host_memory_bytes), sampled every 0.25 s "
        "during the run. GB = 10^9 bytes.",
        "Times are averages over the measured requests, in seconds; queue and transfer time is in Total only.",
    ]
    return Table("latency_breakdown", "Latency breakdown (end2end)", header, rows, notes, commands)


# The bundle README's TensorRT table has these columns; other variants (torch_fp16) are in the breakdown.
SPEEDUP_VARIANTS = ("torch_fp32", "torch_amp", "trt_fp32", "trt_fp16")
SPEEDUP_HEADER = [
    "method", "torch_fp32 (ms)", "torch_amp", "trt_fp32", "trt_fp16",
    "speedup amp", "speedup fp32", "speedup fp16", "amp vs fp16",
]
# (column, numerator variant, denominator variant)
RATIOS = (
    ("speedup amp", "torch_fp32", "torch_amp"),
    ("speedup fp32", "torch_fp32", "trt_fp32"),
    ("speedup fp16", "torch_fp32", "trt_fp16"),
    ("amp vs fp16", "torch_amp", "trt_fp16"),
)


def speedup(raw: Path, runs: list[Run], resolution: str) -> Table:
    """The README's TensorRT table for one resolution: a row per model_computation and end2end scenario."""
    groups: dict[tuple[str, str], dict[str, Run]] = {}
    for run in runs:
        if run.resolution == resolution and run.concurrency == 1 and run.kind in ("model_computation", "end2end"):
            groups.setdefault((run.kind, run.scenario), {})[run.variant] = run
    rows, commands = [], []
    order = sorted(groups, key=lambda k: (k[0] != "model_computation", k[1]))  # model computation first
    for kind, scenario in order:
        by_variant = groups[(kind, scenario)]
        method = kind.replace("_", " ")
        if scenario != kind:
            method += f" ({scenario})"
        ms: dict[str, float] = {}
        cells = []
        for variant in SPEEDUP_VARIANTS:
            run = by_variant.get(variant)
            if run is None:
                cells.append("not available (not measured in this run)")
            elif run.status != "ok":
                cells.append(_unavailable(run))
            else:
                m = measured(raw, run)
                if kind == "model_computation":
                    us = float(m.models[run.network_model]["Server Compute Infer"])
                else:
                    us = m.latency_us
                ms[variant] = us
                cells.append(millis(us))
                commands.append(_command(run))
        for _, num, den in RATIOS:
            if num in ms and den in ms:
                cells.append(f"{ms[num] / ms[den]:.2f}")
            else:
                cells.append(f"not available (needs {' and '.join(v for v in (num, den) if v not in ms)})")
        rows.append([method, *cells])
    notes = [
        "model computation = the network model's `Server Compute Infer` (one [1,1,96,96,96] window per request, "
        "no pre/post processing), from perf_analyzer's CSV of a run against that model alone.",
        "end2end = perf_analyzer's client average latency of the ensemble (CT in, label map out), per variant via "
        "its `network` input.",
        "speedups are torch_fp32 / column (amp, trt_fp32, trt_fp16); amp vs fp16 = torch_amp / trt_fp16.",
    ]
    title = f"TensorRT speedup, {resolution_label(resolution)} ({resolution})"
    return Table(f"speedup_{resolution}", title, SPEEDUP_HEADER, rows, notes, commands)


def concurrency(raw: Path, runs: list[Run]) -> Table:
    """Throughput, latency and server queue time of the ensemble per concurrency level."""
    chosen = [r for r in runs if r.kind == "concurrency"]
    percentiles = sorted({p for r in chosen for p in r.percentiles}) or [50, 95, 99]
    header = ["scenario", "model", "network", "concurrency", "throughput (infer/s)", "avg latency (s)"]
    header += [f"p{p} latency (s)" for p in percentiles]
    header += ["server queue, stages (s)", "server queue, network (s)", "memory"]
    rows, commands = [], []
    for run in sorted(chosen, key=lambda r: (r.scenario, r.resolution, r.variant, r.concurrency)):
        label = [run.scenario, resolution_label(run.resolution), run.variant, str(run.concurrency)]
        if run.status != "ok":
            rows.append(label + [_unavailable(run)] + [""] * (len(header) - len(label) - 1))
            continue
        m = measured(raw, run)
        stages = sum(float(m.models[s]["Server Queue"]) for s in (PREPROCESS, SLIDING_WINDOW, POSTPROCESS))
        rows.append(label + [
            f"{float(m.top['Inferences/Second']):.4f}",
            seconds(m.latency_us),
            *[seconds(float(m.top[f"p{p} latency"])) for p in percentiles],
            seconds(stages),
            "in-process" if run.network_in_process else seconds(float(m.models[run.network_model]["Server Queue"])),
            memory(run, m),
        ])
        commands.append(_command(run))
    notes = [
        "throughput and latencies: perf_analyzer's client side (Inferences/Second, Avg and pN latency).",
        f"server queue, stages = the sum of `Server Queue` (average per request) of `{PREPROCESS}`, "
        f"`{SLIDING_WINDOW}` and `{POSTPROCESS}` (composing-model CSVs); network = the same column of the network "
        "model called by BLS (average per window batch).",
        "memory: as in the latency breakdown.",
    ]
    return Table("concurrency", "End to end under concurrency", header, rows, notes, commands)


def machine_line(machine: dict[str, Any], server: dict[str, Any]) -> str:
    parts = [f"CPU {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"]
    for gpu in machine.get("gpus", []):
        parts.append(f"GPU {gpu['name']} ({gpu['memory']}, driver {gpu['driver']})")
    if not machine.get("gpus"):
        parts.append("no GPU")
    parts.append(f"Triton {server.get('triton_version', '?')}")
    trt = sorted({m["tensorrt_version"] for m in server.get("models", {}).values() if m.get("tensorrt_version")})
    parts.append(f"TensorRT {', '.join(trt)}" if trt else "TensorRT: no TensorRT model loaded")
    return "; ".join(parts)


def render(raw: Path, manifest: dict[str, Any]) -> list[Table]:
    """Every table that the manifest's runs feed (tables without rows are left out)."""
    runs = [Run.from_json(r) for r in manifest["runs"]]
    tables = [latency_breakdown(raw, runs)]
    for resolution in sorted({r.resolution for r in runs if r.kind in ("model_computation", "end2end")}):
        tables.append(speedup(raw, runs, resolution))
    tables.append(concurrency(raw, runs))
    return [t for t in tables if t.rows]


def write_tables(out: Path, manifest: dict[str, Any]) -> Path:
    """Write `out/tables.md` and `out/<table>.csv` from `out/raw/`; returns the Markdown's path."""
    raw = Path(out) / "raw"
    tables = render(raw, manifest)
    line = machine_line(manifest.get("machine", {}), manifest.get("server", {}))
    text = [
        f"# Benchmarks on {manifest.get('machine', {}).get('slug', '?')}",
        "",
        "Rendered by `python -m perf` from perf_analyzer 2.51's CSVs under raw/ (git-ignored). "
        "Reproduce with:",
        "",
        "```",
        manifest.get("invocation", "python -m perf"),
        "```",
        "",
        f"Machine: {line}",
        "",
        *[f"Note: {note}\n" for note in manifest.get("notes", [])],
    ]
    for table in tables:
        text.append(table.markdown(line))
        table.write_csv(Path(out) / f"{table.name}.csv")
    path = Path(out) / "tables.md"
    path.write_text("\n".join(text))
    return path
