"""How soon the launcher's watchdog reclaims the shared-memory regions of a client that died, and what
they held in the server.

    python -m perf.client_regions                      # 512x512x300 int16: 150 + 75 MiB of regions
    python -m perf.client_regions --shape 256,256,300 --idle-runs 3 --request-runs 1

Serves a copy of the model repository (CPU configs, the launcher's locks and watchdog, the shipped size
limits) with the tests' small network (`--init-filters`). Each client is a child process killed with
SIGKILL together with its process group (its multiprocessing resource tracker too, so nothing of the
client unlinks its files). Two cases:

- idle: the child creates and registers the two regions of a CT (input filled, output zeroed: both
  resident), then waits; not in use, they go within one watchdog interval of the kill;
- mid-request: the child sends the CT through `SegmentationClient` (lowres) and is killed 3 s after
  its regions were registered; Triton computes the request to its end, then the watchdog reclaims them.

Server region memory: the resident size of the client regions the server process maps (stat of
/proc/PID/map_files, counted once per file: the memory that stays allocated while Triton maps them,
unlinked or not), and the sizes registered. Prints a table naming the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tritonclient.grpc as grpcclient

from perf.run import machine_info
from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.client_regions import PREFIX
from wholebody.contract import REPO_ROOT
from wholebody.health import answered_requests
from wholebody.triton_server import LocalTritonServer

log = logging.getLogger("perf.client_regions")

IDLE_CHILD = r'''
import sys, time
from multiprocessing import shared_memory
import numpy as np
import tritonclient.grpc as grpcclient
from wholebody.client_regions import region_name, this_process

url, voxels = sys.argv[1], int(sys.argv[2])
client, owner, kept = grpcclient.InferenceServerClient(url), this_process(), []
for role, size in (("in", 2 * voxels), ("out", voxels)):
    name = region_name(owner, 0, role)
    memory = shared_memory.SharedMemory(name, create=True, size=size)
    np.ndarray(size, np.uint8, buffer=memory.buf)[:] = 1  # resident, as a written CT and labels are
    client.register_system_shared_memory(name, f"/{name}", size)
    kept.append(memory)
print("ready", flush=True)
time.sleep(3600)
'''

REQUEST_CHILD = r'''
import sys
from client import SegmentationClient
from wholebody.sample_data import synthetic_ct
import numpy as np

url, shape = sys.argv[1], tuple(int(n) for n in sys.argv[2].split(","))
ct = synthetic_ct(shape, (0.8, 0.8, 1.0), seed=5)
image = np.asarray(ct.dataobj)
print("ready", flush=True)
SegmentationClient(url).segment(image, ct.affine, resolution="lowres")
'''


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def registered(url: str, pid: int) -> dict[str, int]:
    """{region: bytes} registered on the server by client process `pid`."""
    status = grpcclient.InferenceServerClient(url).get_system_shared_memory_status(as_json=True)
    return {n: int(r["byte_size"]) for n, r in status.get("regions", {}).items() if n.startswith(f"{PREFIX}_{pid}_")}


def mapped_bytes(server_pid: int, pid: int) -> int:
    """Resident bytes of the regions of client `pid` that process `server_pid` maps (each file once)."""
    seen: dict[int, int] = {}
    for line in Path(f"/proc/{server_pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith(f"/dev/shm/{PREFIX}_{pid}_"):
            stat = os.stat(f"/proc/{server_pid}/map_files/{fields[0]}")
            seen[stat.st_ino] = stat.st_blocks * 512
    return sum(seen.values())



def one_run(server: LocalTritonServer, script: str, arg: str, mid_request: bool) -> dict[str, float]:
    """Start a child client, kill its group once its regions are registered (3 s later mid-request);
    seconds from the kill to files and regions gone, to the request's end, and the memory around.

    First waits until the watchdog has trimmed the idle stages: a reload during the run would reset the
    ensemble's statistics (the request's end) and slow the request. Raises RuntimeError when the child
    never registers its regions, or its request ends before the kill."""
    assert server.process is not None
    server.wait_lean()
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    child = subprocess.Popen([sys.executable, "-c", script, server.grpc_url, arg], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        before_requests = answered_requests(server.grpc_url)
        deadline = time.monotonic() + 120
        while len(regions := registered(server.grpc_url, child.pid)) < 2:
            if time.monotonic() > deadline or child.poll() is not None:
                raise RuntimeError("the client's regions were never registered")
            time.sleep(0.05)
        if mid_request:
            time.sleep(3.0)
            if answered_requests(server.grpc_url) != before_requests:
                raise RuntimeError("the request ended before the kill; use a larger --shape")
        held = mapped_bytes(server.process.pid, child.pid)
        mine = f"{PREFIX}_{child.pid}_"
        os.killpg(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        child.wait()
        times: dict[str, float] = {}
        while "regions" not in times:
            now = time.monotonic() - killed
            if "files" not in times and not [f for f in os.listdir("/dev/shm") if f.startswith(mine)]:
                times["files"] = now
            if "request" not in times and answered_requests(server.grpc_url) != before_requests:
                times["request"] = now
            if not registered(server.grpc_url, child.pid):
                times["regions"] = now
            if now > 600:
                raise RuntimeError(f"regions {sorted(regions)} still registered 600 s after the kill")
            time.sleep(0.05)
        times.setdefault("files", times["regions"])
        times.setdefault("request", 0.0)
        after = mapped_bytes(server.process.pid, child.pid)
        log.info("run: %s", {k: round(v, 2) for k, v in times.items()})
        return {**times, "registered": sum(regions.values()), "held": held, "after": after}
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.client_regions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="512,512,300", help="the CT's voxels, X,Y,Z (int16)")
    parser.add_argument("--idle-runs", type=int, default=5)
    parser.add_argument("--request-runs", type=int, default=3)
    parser.add_argument("--init-filters", type=int, default=8, help="network width (8: the tests' network)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    shape = tuple(int(n) for n in args.shape.split(","))
    voxels = shape[0] * shape[1] * shape[2]
    results: dict[str, list[dict[str, float]]] = {"idle": [], "mid-request": []}
    with tempfile.TemporaryDirectory(prefix="perf-client-regions-") as tmp:
        bundle = make_test_bundle(Path(tmp) / "bundle", init_filters=args.init_filters, seed=0)
        repo = copy_model_repository(Path(tmp) / "model_repository")
        install_bundle(bundle, repo)
        with LocalTritonServer(model_repository=repo, watchdog=True) as server:
            for _ in range(args.idle_runs):
                results["idle"].append(one_run(server, IDLE_CHILD, str(voxels), mid_request=False))
            for _ in range(args.request_runs):
                results["mid-request"].append(one_run(server, REQUEST_CHILD, args.shape, mid_request=True))
    info = machine_info()
    print(f"\nMachine: {info['cpu']}, {info['cores']} cores; CT {'x'.join(map(str, shape))} int16 "
          f"(regions {mib(voxels * 3)}); watchdog interval 2 s; client and its process group killed with SIGKILL\n")
    print("| client killed | runs | files gone after the kill | request ended after the kill | regions gone after "
          "the kill | regions gone after the request's end | server region memory before → after |")
    print("|---|---|---|---|---|---|---|")
    for case, runs in results.items():
        if not runs:
            continue

        def mean(key: str, rows: list[dict[str, float]] = runs) -> str:
            values = [r[key] for r in rows]
            return f"{statistics.mean(values):.1f} s (max {max(values):.1f})"

        tail = [r["regions"] - r["request"] for r in runs] if case == "mid-request" else []
        print(f"| {case} | {len(runs)} | {mean('files')} | {mean('request') if tail else '—'} | {mean('regions')} | "
              f"{f'{statistics.mean(tail):.1f} s (max {max(tail):.1f})' if tail else '—'} | "
              f"{mib(statistics.mean(r['held'] for r in runs))} (registered {mib(runs[0]['registered'])}) → "
              f"{mib(max(r['after'] for r in runs))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
