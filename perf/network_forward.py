"""One network forward on the CPU, per serving setting: time, page faults, memory.

    python -m perf.network_forward                 # lowres, real-size random weights, 3 rounds
    python -m perf.network_forward --bundle /path/to/wholeBody_ct_segmentation --rounds 5

Each setting runs in a fresh process (huge pages can only be chosen before PyTorch's first large
allocation), one 96^3 window, one untimed forward and then `--forwards` timed ones, each ending
with contiguous fp32 logits as the network model returns them. Rounds alternate the settings, so
a drift in the machine's speed hits all of them; the table shows medians over every timed forward.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from wholebody.triton_server.install import DEFAULT_CACHE

log = logging.getLogger("perf.network_forward")

# name -> (memory layout, huge pages): the bundle's own way first, the served CPU default last
SETTINGS = {
    "contiguous (the bundle)": ("contiguous", False),
    "channels_last_3d, logits transposed": ("channels_last_transposed", False),
    "channels_last_3d, contiguous logits": ("channels_last", False),
    "channels_last_3d, contiguous logits, huge pages (served)": ("channels_last", True),
}


def run_child(bundle: Path, resolution: str, layout: str, huge_pages: bool, forwards: int) -> dict[str, list[float]]:
    """In the child process: the timed forwards of one setting."""
    from wholebody.memory import enable_huge_pages

    if huge_pages and not enable_huge_pages():
        raise SystemExit("transparent huge pages are off in this kernel")
    import torch

    from wholebody.bundle import load_network
    from wholebody.contract import IN_CHANNELS, ROI_SIZE
    from wholebody.layout import channels_last

    torch.set_num_threads(os.cpu_count() or 1)
    network = load_network(bundle, resolution)
    memory_format = torch.contiguous_format
    if layout == "channels_last":
        network = channels_last(network, torch.randn(1, IN_CHANNELS, 32, 32, 32))
        memory_format = torch.channels_last_3d
    elif layout == "channels_last_transposed":
        network = network.to(memory_format=torch.channels_last_3d)
        memory_format = torch.channels_last_3d
    window = torch.randn(1, IN_CHANNELS, *ROI_SIZE, generator=torch.Generator().manual_seed(0))
    window = window.contiguous(memory_format=memory_format)
    result: dict[str, list[float]] = {"seconds": [], "faults": [], "peak_gb": []}
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.inference_mode():
        network(window).contiguous()  # untimed: oneDNN's primitives, weight reorders
        for _ in range(forwards):
            before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            logits = network(window).contiguous()
            seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
            del logits
            result["seconds"].append(seconds)
            result["faults"].append(after.ru_minflt - before.ru_minflt)
            result["peak_gb"].append(after.ru_maxrss * 1024 / 2**30)
    result["loaded_gb"] = [loaded * 1024 / 2**30]
    return result


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        bundle, resolution, layout, huge_pages, forwards = sys.argv[2:7]
        print(json.dumps(run_child(Path(bundle), resolution, layout, huge_pages == "yes", int(forwards))))
        return 0
    parser = argparse.ArgumentParser(
        prog="python -m perf.network_forward", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--bundle", type=Path, help="MONAI bundle directory (default: real-size random weights)")
    parser.add_argument("--resolution", choices=("lowres", "highres"), default="lowres")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all settings (default: %(default)s)")
    parser.add_argument("--forwards", type=int, default=2, help="timed forwards per process (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    bundle = args.bundle
    if bundle is None:
        from wholebody.bundle import make_test_bundle

        bundle = args.cache / "bundle_f32"
        if not (bundle / "models" / "model_lowres.pt").exists():
            make_test_bundle(bundle, init_filters=32, seed=0)
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in SETTINGS}
    for round_ in range(args.rounds):
        for name, (layout, huge_pages) in SETTINGS.items():
            log.info("round %d of %d: %s", round_ + 1, args.rounds, name)
            cmd = [
                sys.executable, "-m", "perf.network_forward", "--child",
                str(bundle), args.resolution, layout, "yes" if huge_pages else "no", str(args.forwards),
            ]
            output = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            for key, values in json.loads(output.strip().splitlines()[-1]).items():
                runs[name].setdefault(key, []).extend(values)
    print(
        f"\n{args.resolution}, one 96^3 window, {os.cpu_count()} CPU threads; weights: {bundle}; medians of "
        f"{args.rounds} alternated rounds x {args.forwards} forwards\n"
    )
    print("| setting | forward s (logits contiguous) | page faults per forward "
          "| peak RSS GB (with the network loaded) |")
    print("|---|---|---|---|")
    for name, run in runs.items():
        print(
            f"| {name} | {np.median(run['seconds']):.2f} | {np.median(run['faults']):,.0f} | "
            f"{np.median(run['peak_gb']):.2f} ({np.median(run['loaded_gb']):.2f}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
