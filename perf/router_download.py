"""How fast the router gets a series out of Orthanc: the zip archive (`/series/{id}/archive`, what the router
did) against the instances fetched in parallel (`/instances/{id}/file`, `OrthancClient.download_instances`,
what it does now) with 1, 4 and 8 workers; each followed by the same read (clinical.dicom_series).

Everything is real and on loopback: the CT is written as a DICOM series (one file per slice), stored in a
real Orthanc (router.orthanc.OrthancNode, Debian's Orthanc 1.10, the configuration `router stack` runs:
HttpThreadsCount 8) by REST, then fetched by each method in turn, `--repeats` rounds, after one untimed
fetch that puts Orthanc's files in the page cache for every method alike. Each fetched volume is checked
against the first (same voxels).

  python -m perf.router_download                        # synthetic 512x512x397 int16 CT (0.84x0.84x1.5 mm)
  python -m perf.router_download --ct aorta --repeats 1  # the real chest CT, 233x167x191

Prints a Markdown table naming the machine; `--json FILE` keeps the numbers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import logging
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from perf.client_footprint import machine
from perf.router_latency import ct_image
from router.orthanc import OrthancClient, OrthancNode

log = logging.getLogger("perf.router_download")


def fetch(client: OrthancClient, series_id: str, method: str, work: Path) -> tuple[float, float, np.ndarray]:
    """One fetch and read by `method` ("zip" or "parallel-N"): (download s, read s, the volume)."""
    from clinical.dicom_series import read_ct_series

    folder = Path(tempfile.mkdtemp(prefix="fetch-", dir=work))
    try:
        t = time.monotonic()
        if method == "zip":
            source = client.download_series(series_id, folder / "series.zip")
        else:
            source = folder / "instances"
            source.mkdir()
            client.download_instances(series_id, source, workers=int(method.split("-")[1]))
        download = time.monotonic() - t
        t = time.monotonic()
        (series,) = read_ct_series(source)
        return download, time.monotonic() - t, series.volume
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> dict[str, object]:
    from clinical.dicom_series import write_ct_series

    image, what = ct_image(args.ct)
    folder = work / "ct"
    write_ct_series(np.asarray(image.dataobj, dtype=np.int16), image.affine, folder, series_description="CT perf")
    files = sorted(folder.iterdir())
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    methods = ["zip"] + [f"parallel-{n}" for n in args.workers]
    times: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    with OrthancNode(storage=work / "orthanc" / "storage") as node:
        client = OrthancClient(node.url, timeout_s=600.0)
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(client.store_instance, files))
        (series_id,) = {a["ParentSeries"] for a in answers}
        log.info("stored %d instances (%.0f MB) in Orthanc; warming the page cache", len(files), size_mb)
        _, _, reference = fetch(client, series_id, "parallel-4", work)
        for round_ in range(args.repeats):
            for method in methods:
                download, read, volume = fetch(client, series_id, method, work)
                if not np.array_equal(volume, reference):
                    raise RuntimeError(f"{method}: the volume read differs from the stored one")
                del volume
                times[method].append((download, read))
                log.info("round %d, %s: download %.2f s, read %.2f s", round_ + 1, method, download, read)
        client.close()
    return {"ct": what, "instances": len(files), "size_mb": size_mb, "repeats": args.repeats,
            "times": {m: [list(t) for t in ts] for m, ts in times.items()}, "machine": machine()}


def table(result: dict[str, object]) -> str:
    times: dict[str, list[list[float]]] = result["times"]  # type: ignore[assignment]
    size = float(result["size_mb"])  # type: ignore[arg-type]
    zip_total = statistics.median(d + r for d, r in times["zip"])
    lines = [f"Machine: {result['machine']}",
             f"CT: {result['ct']}; {result['instances']} instances, {size:.0f} MB of DICOM; median of "
             f"{result['repeats']} round(s), Orthanc's files in the page cache",
             "", "| method | download s | read s | download + read s | MB/s (download) | vs zip |",
             "|---|---:|---:|---:|---:|---:|"]
    for method, runs in times.items():
        download = statistics.median(d for d, _ in runs)
        read = statistics.median(r for _, r in runs)
        total = statistics.median(d + r for d, r in runs)
        label = "zip archive (`/series/{id}/archive`)" if method == "zip" else \
            f"instances in parallel, {method.split('-')[1]} worker(s)"
        lines.append(f"| {label} | {download:.2f} | {read:.2f} | {total:.2f} | {size / download:.0f} | "
                     f"{zip_total / total:.1f}x |")
    return "\n".join(lines)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m perf.router_download", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", choices=("synthetic", "example", "aorta"), default="synthetic")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 8], metavar="N",
                        help="parallel fetches to compare (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every method (default %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the numbers here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a stopped run still stops its Orthanc and removes its files
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="router-download-") as work:
        result = measure(args, Path(work))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
