"""Server memory around accepted and refused large volumes, and recovery after a stub dies.

    python -m perf.hardening                      # quarter scale: 256x256 slices, limits / 4 (~3 min)
    python -m perf.hardening --side 512            # the issue's full 512x512x1500 / x2100 (needs ~16 GB)

Serves a copy of the model repository (CPU configs, the launcher's locks and watchdog) with a
network of the real architecture and `--init-filters` (8: the tests' small network). The ensemble's
limits are the shipped ones scaled by (side/512)^2, so a side x side x 1500 CT is accepted and a
side x side x 2100 CT is refused, as 512x512 ones are with the shipped limits. Volumes go over system
shared memory. Server memory is `perf.run.host_memory_bytes` of the server's process group (private
memory of every process plus each /dev/shm region once); peaks are sampled every 0.1 s. Prints a table
naming the machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException
from tritonclient.utils import shared_memory as shm

from perf.run import MemorySampler, host_memory_bytes, machine_info
from wholebody import health
from wholebody.bundle import copy_model_repository, install_bundle, make_test_bundle
from wholebody.contract import (
    AFFINE,
    ENSEMBLE,
    IMAGE,
    LABEL_MAP,
    PREPROCESS,
    RESOLUTION,
    SLIDING_WINDOW,
    network_model_name,
)
from wholebody.served_models import parameters_of
from wholebody.triton_server import LocalTritonServer
from wholebody.triton_server.stubs import stubs_of
from wholebody.validation import MAX_INPUT_VOXELS, MAX_RESAMPLED_VOXELS, SizeLimits, write_size_limits

log = logging.getLogger("perf.hardening")

SHIPPED = SizeLimits(max_input_voxels=536_870_912, max_resampled_voxels=224_000_000)
SPACING_MM = (0.8, 0.8, 1.0)  # a typical whole-body CT's voxel size
NETWORK_MODEL = network_model_name("lowres", "torch_fp32")
MODELS = [ENSEMBLE, PREPROCESS, SLIDING_WINDOW, "postprocess", NETWORK_MODEL]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def wait_lean(server: LocalTritonServer) -> float:
    """Seconds until the watchdog has trimmed every idle stage (LocalTritonServer.wait_lean)."""
    started = time.monotonic()
    server.wait_lean()
    return time.monotonic() - started


def send(client: grpcclient.InferenceServerClient, shape: tuple[int, int, int]) -> tuple[str, float]:
    """One CT of `shape` over system shared memory; ('accepted'|'refused: ...', seconds)."""
    volume = np.full(shape, -1000.0, dtype=np.float32)
    volume[shape[0] // 4 : 3 * shape[0] // 4, shape[1] // 4 : 3 * shape[1] // 4, :] = 40.0
    name = f"perf_hardening_{os.getpid()}"
    region = shm.create_shared_memory_region(name, f"/{name}", volume.nbytes)
    try:
        shm.set_shared_memory_region(region, [volume])
        del volume
        client.register_system_shared_memory(name, f"/{name}", int(np.prod(shape)) * 4)
        image = grpcclient.InferInput(IMAGE, list(shape), "FP32")
        image.set_shared_memory(name, int(np.prod(shape)) * 4)
        affine = grpcclient.InferInput(AFFINE, [4, 4], "FP64")
        affine.set_data_from_numpy(np.diag([*SPACING_MM, 1.0]))
        resolution = grpcclient.InferInput(RESOLUTION, [1], "BYTES")
        resolution.set_data_from_numpy(np.array([b"lowres"], dtype=np.object_))
        started = time.monotonic()
        try:
            result = client.infer(ENSEMBLE, [image, affine, resolution])
            outcome = "accepted" if result.as_numpy(LABEL_MAP).shape == shape else "wrong shape"
        except InferenceServerException as exc:
            outcome = f"refused ({str(exc.status()).removeprefix('StatusCode.')})"
        return outcome, time.monotonic() - started
    finally:
        try:
            unregister(client, name)
        finally:
            shm.destroy_shared_memory_region(region)


def unregister(client: grpcclient.InferenceServerClient, name: str, timeout_s: float = 30) -> None:
    """Unregister a system shared-memory region, waiting while Triton still holds the request that
    used it (after an error response the request is released a moment later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.unregister_system_shared_memory(name)
            return
        except InferenceServerException as exc:
            if "in use" not in exc.message() or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def client_refusal(client: grpcclient.InferenceServerClient, shape: tuple[int, int, int]) -> tuple[str, float]:
    """What a client does first: read the limits from the ensemble's config and refuse locally."""
    started = time.monotonic()
    limits = SizeLimits.from_parameters(parameters_of(client.get_model_config(ENSEMBLE).config))
    try:
        limits.check_input(shape)
        outcome = "would send"
    except ValueError:
        outcome = "refused locally, 0 bytes sent"
    return outcome, time.monotonic() - started


def recovery(server: LocalTritonServer, client: grpcclient.InferenceServerClient, model: str) -> float:
    """SIGKILL `model`'s stub; seconds until a small CT through the ensemble succeeds again."""
    pid = next(s.pid for s in stubs_of(server.pids()) if s.model == model)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    while time.monotonic() - killed < 120:
        if send(client, (24, 24, 24))[0] == "accepted":
            return time.monotonic() - killed
        time.sleep(0.5)
    return float("nan")


def measured(
    server: LocalTritonServer, action: Callable[[], tuple[str, float]]
) -> tuple[str, float, int, int, int, float]:
    """(outcome, seconds, peak, right after, once the watchdog trimmed, seconds to trim)."""
    assert server.process is not None
    with MemorySampler(server_pid=server.process.pid, interval_s=0.1) as sampler:
        outcome, seconds = action()
    after = host_memory_bytes(server.pids())
    trim_s = wait_lean(server)
    return outcome, seconds, sampler.peak_host or after, after, host_memory_bytes(server.pids()), trim_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.hardening", description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=256, help="in-plane size of the test CTs (512: the issue's)")
    parser.add_argument("--accepted-slices", type=int, default=1500)
    parser.add_argument("--refused-slices", type=int, default=2100)
    parser.add_argument("--init-filters", type=int, default=8, help="network width (8: the tests' network, 32: real)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    scale = (args.side / 512) ** 2
    limits = SizeLimits(int(SHIPPED.max_input_voxels * scale), int(SHIPPED.max_resampled_voxels * scale))
    accepted = (args.side, args.side, args.accepted_slices)
    refused = (args.side, args.side, args.refused_slices)
    rows: list[tuple[str, str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="perf-hardening-") as tmp:
        bundle = make_test_bundle(Path(tmp) / "bundle", init_filters=args.init_filters, seed=0)
        repo = copy_model_repository(Path(tmp) / "model_repository")
        install_bundle(bundle, repo)
        write_size_limits(repo, limits.max_input_voxels, limits.max_resampled_voxels)
        with LocalTritonServer(model_repository=repo, models=MODELS, watchdog=True) as server:
            client = grpcclient.InferenceServerClient(server.grpc_url)
            send(client, (24, 24, 24))  # warm: first forward
            wait_lean(server)
            idle = host_memory_bytes(server.pids())
            rows.append(("idle (after one tiny CT)", "", "", gib(idle), "", ""))
            for shape in (accepted, refused):
                label = f"CT {'x'.join(map(str, shape))}"
                log.info("sending %s (%s of float32)", label, gib(np.prod(shape) * 4))
                outcome, seconds, peak, after, trimmed, trim_s = measured(server, lambda s=shape: send(client, s))
                rows.append(
                    (f"{label}: {outcome}", f"{seconds:.1f} s", gib(peak), gib(after), gib(trimmed), f"{trim_s:.0f} s")
                )
            outcome, seconds = client_refusal(client, refused)
            label = f"CT {'x'.join(map(str, refused))}"
            rows.append((f"{label}: {outcome}", f"{seconds * 1000:.0f} ms", gib(idle), "", "", ""))
            reloads = len(server._watchdog.reloads) if server._watchdog else 0
            recoveries = [(m, recovery(server, client, m)) for m in (NETWORK_MODEL, SLIDING_WINDOW, PREPROCESS)]
            if server._watchdog is not None:
                server._watchdog.stop()
            pid = next(s.pid for s in stubs_of(server.pids()) if s.model == PREPROCESS)
            os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            code = health.main(["-u", server.grpc_url, "--timeout", "30"])
            unhealthy_line = f"exit {code} after {time.monotonic() - started:.1f} s"
    info = machine_info()
    print(f"\nMachine: {info['cpu']}, {info['cores']} cores; network init_filters={args.init_filters}; "
          f"limits {MAX_INPUT_VOXELS}={limits.max_input_voxels:,}, "
          f"{MAX_RESAMPLED_VOXELS}={limits.max_resampled_voxels:,} "
          f"(shipped x {scale:g}); CT spacing {SPACING_MM} mm, lowres, shared memory; watchdog bound "
          f"{server.max_idle_pool_bytes // 2**20} MiB per idle stub pool\n")
    print("| request | time | peak server memory | right after | idle, after the watchdog | watchdog trim |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\n(watchdog reloads for pools during the run: {reloads})\n")
    print("| stub killed (SIGKILL) | serving again after (watchdog on) |")
    print("|---|---|")
    for model, seconds in recoveries:
        print(f"| {model} | {seconds:.1f} s |")
    print(f"| {PREPROCESS}, watchdog off | health command: {unhealthy_line} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
