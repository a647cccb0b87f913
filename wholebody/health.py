"""A real liveness check: a tiny synthetic CT through the ensemble, for each loaded resolution.

    python -m wholebody.health -u localhost:8001 --timeout 30

Exit 0 and one line (`healthy: ...`) when every resolution whose network is loaded returned a correct
label map within the deadline; exit 1 and one line (`unhealthy: <reason>`) otherwise. A server that is
busy with a long request (one sliding-window instance works on one CT at a time) is not dead: when the
check times out but the network models computed windows meanwhile (Triton's statistics), it passes as
`healthy (busy)`. When the sliding-window stage runs the network in its own process (`placement:
in_process`, the CPU default) no network model is loaded: each resolution is probed with the stage's
default network, and a timed-out probe counts as busy when it got through `preprocess` (the pipeline
answers; the sliding window is occupied) — weaker than counting windows: a hung sliding-window stub
is then reported busy, not dead. Kubernetes: an exec liveness probe with `timeoutSeconds` above `--timeout`.
Uses only the inference, health, model-config and statistics protocols (no operator key).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from wholebody.contract import (
    AFFINE,
    ENSEMBLE,
    ENSEMBLE_INT16,
    IMAGE,
    LABEL_MAP,
    NETWORK,
    NUM_CLASSES,
    PREPROCESS,
    RESOLUTION,
    RESOLUTIONS,
    SLIDING_WINDOW,
    TORCH_VARIANTS,
    VARIANTS,
    network_model_name,
)
from wholebody.served_models import json_parameters

# 12^3 voxels of 3 mm (one window at either resolution): a soft-tissue block in air.
PROBE_SHAPE = (12, 12, 12)
PROBE_SPACING_MM = 3.0


class Unhealthy(Exception):
    """The server failed the check; the message is the one-line reason."""


def probe_ct() -> tuple[np.ndarray, np.ndarray]:
    """A [12, 12, 12] float32 CT in HU (-1000 air around a 40 HU block) and its 3 mm RAS affine."""
    image = np.full(PROBE_SHAPE, -1000.0, dtype=np.float32)
    image[3:9, 3:9, 3:9] = 40.0
    return image, np.diag([PROBE_SPACING_MM] * 3 + [1.0])


@dataclass
class Probe:
    """What to send: one (resolution, network variant) per loaded resolution."""

    resolution: str
    variant: str


def plan(client: Any, timeout_s: float) -> tuple[list[Probe], list[str]]:
    """What to probe, and the models whose successful executions show work in progress.

    BLS placement: one probe per resolution that has a loaded network model (the sliding window's
    default if loaded); progress = those network models' executions. In-process placement: one probe
    per resolution with the sliding window's default network; progress = preprocess's executions.
    """
    config = client.get_model_config(SLIDING_WINDOW, as_json=True, client_timeout=timeout_s)["config"]
    parameters = json_parameters(config)
    default = parameters.get("default_network", "")
    if parameters.get("placement", "") == "in_process":
        if default not in TORCH_VARIANTS:
            raise Unhealthy(f"{SLIDING_WINDOW} runs the network in-process but its default network is {default!r}")
        return [Probe(resolution, default) for resolution in RESOLUTIONS], [PREPROCESS]
    probes = []
    for resolution in RESOLUTIONS:
        names = {v: network_model_name(resolution, v) for v in VARIANTS}
        loaded = [v for v, name in names.items() if client.is_model_ready(name, client_timeout=timeout_s)]
        if loaded:
            probes.append(Probe(resolution, default if default in loaded else loaded[0]))
    if not probes:
        raise Unhealthy("no network model is loaded")
    return probes, [network_model_name(p.resolution, p.variant) for p in probes]


def executions(client: Any, models: list[str], timeout_s: float) -> int:
    """Successful executions of `models` so far (Triton's statistics)."""
    total = 0
    for name in models:
        stats = client.get_inference_statistics(name, as_json=True, client_timeout=timeout_s)
        for model in stats.get("model_stats", []):
            total += int(model.get("inference_stats", {}).get("success", {}).get("count", 0))
    return total


def answered_requests(url: str, models: tuple[str, ...] = (ENSEMBLE, ENSEMBLE_INT16)) -> int:
    """Requests `models` (default: the two ensembles) have answered, successfully or not, so far (Triton's
    statistics); tests and benchmarks compare it before and after to see whether a request was sent."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        total = 0
        for model in models:
            stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]["inference_stats"]
            total += sum(int(stats[k].get("count", 0)) for k in ("success", "fail"))
        return total
    finally:
        client.close()


def check(url: str, timeout_s: float) -> str:
    """Run the check against the gRPC server at `url`; returns the healthy line, raises Unhealthy."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    started = time.monotonic()

    def left() -> float:
        remaining = timeout_s - (time.monotonic() - started)
        if remaining <= 0:
            raise TimeoutError
        return remaining

    client = grpcclient.InferenceServerClient(url)
    image, affine = probe_ct()
    done: list[str] = []
    probes: list[Probe] = []
    progress_models: list[str] = []
    before = None
    try:
        if not client.is_server_live(client_timeout=left()):
            raise Unhealthy("server not live")
        if not client.is_model_ready(ENSEMBLE, client_timeout=left()):
            raise Unhealthy(f"{ENSEMBLE} is not ready")
        probes, progress_models = plan(client, left())
        before = executions(client, progress_models, left())
        for probe in probes:
            inputs = [
                grpcclient.InferInput(IMAGE, list(image.shape), "FP32"),
                grpcclient.InferInput(AFFINE, [4, 4], "FP64"),
            ]
            inputs[0].set_data_from_numpy(image)
            inputs[1].set_data_from_numpy(affine)
            for name, value in ((RESOLUTION, probe.resolution), (NETWORK, probe.variant)):
                tensor = grpcclient.InferInput(name, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([value.encode()], dtype=np.object_))
                inputs.append(tensor)
            t0 = time.monotonic()
            labels = client.infer(ENSEMBLE, inputs, client_timeout=left()).as_numpy(LABEL_MAP)
            wrong = labels is None or labels.shape != image.shape or labels.dtype != np.uint8
            if wrong or int(labels.max()) >= NUM_CLASSES:
                raise Unhealthy(f"{probe.resolution}/{probe.variant}: wrong label map returned")
            done.append(f"{probe.resolution}/{probe.variant} {time.monotonic() - t0:.1f} s")
    except (TimeoutError, InferenceServerException) as exc:
        if isinstance(exc, InferenceServerException) and "DEADLINE_EXCEEDED" not in str(exc.status()):
            raise Unhealthy(exc.message() or str(exc)) from None
        if before is not None and probes:
            try:
                after = executions(client, progress_models, 5.0)
            except InferenceServerException:
                after = before
            if after > before:
                return (
                    f"healthy (busy): no answer within {timeout_s:g} s, "
                    f"but {', '.join(progress_models)} executed {after - before} times meanwhile"
                )
        raise Unhealthy(f"no answer within {timeout_s:g} s and no network work done meanwhile") from None
    finally:
        client.close()
    return f"healthy: {', '.join(done)}"


def build_parser() -> argparse.ArgumentParser:
    """The CLI's parser; tests/test_docs.py parses the docs' commands with it."""
    parser = argparse.ArgumentParser(
        prog="python -m wholebody.health",
        description="Liveness check: segment a tiny synthetic CT through the ensemble for each loaded "
        "resolution within a deadline. Exit 0 when healthy, 1 with a one-line reason otherwise.",
    )
    parser.add_argument("-u", "--url", default="localhost:8001", help="the server's gRPC HOST:PORT")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds for the whole check (default 30)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        print(check(args.url, args.timeout))
        return 0
    except Unhealthy as exc:
        print(f"unhealthy: {exc}".replace("\n", " "))
        return 1


if __name__ == "__main__":
    sys.exit(main())
