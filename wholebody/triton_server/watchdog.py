"""The watchdog: a model whose stub died, or whose idle stub keeps a large pool, is reloaded; dead clients'
shared-memory regions are reclaimed."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wholebody.triton_server.locks import operator_headers
from wholebody.triton_server.processes import cpu_seconds
from wholebody.triton_server.regions import ClientRegionReclaimer
from wholebody.triton_server.stubs import resident_bytes, stubs_of

if TYPE_CHECKING:
    from wholebody.triton_server.local import LocalTritonServer

log = logging.getLogger(__name__)

RELOAD_PARAMETER = "wholebody_reload"  # a config override that changes nothing but makes Triton reload


@dataclass
class StubWatchdog:
    """Keeps every READY Python-backend model serving and lean, with the operator key.

    Triton 2.51 does not restart a dead stub (the OOM killer's SIGKILL): its model fails every later
    request while the server and the model still report ready. And a stub's shared-memory pool grows to
    the largest request it saw (inputs are copied into it, even those it then refuses) and never
    shrinks. Every `interval_s` this compares the live stubs of each READY model with what its config
    asks for: a model that lost one is reloaded at once. When the whole server was idle over an
    interval (its processes used under 0.1 s of CPU: nothing in flight) and the stub of a model with
    variable-size tensors (the stages, not the network models, whose pools are bounded by their
    config) holds a pool above `max_idle_pool_bytes`, that model is reloaded too, to a fresh 1 MiB pool.

    A reload is Triton's own: `load_model` with the model's current config plus a changed parameter
    `wholebody_reload` (a load of an unchanged model does nothing); the old instance keeps serving until
    the new one is ready, and the ensemble is not touched. A reload that fails leaves the model
    unavailable, and then the server's readiness (strict) answers not ready.

    In a thread of its own, every `interval_s`, `regions` (ClientRegionReclaimer) unregisters the
    shared-memory regions of clients that exited and removes their /dev/shm files: within one interval
    (2 s) of the client's death, or of the end of the request still using them, also while a reload runs.
    """

    server: LocalTritonServer
    interval_s: float = 2.0
    max_idle_pool_bytes: int = 64 * 2**20
    reloads: list[tuple[str, str, float]] = field(default_factory=list)  # (model, why, seconds)
    regions: ClientRegionReclaimer = field(default_factory=ClientRegionReclaimer)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _regions_thread: threading.Thread | None = None

    def start(self) -> StubWatchdog:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="stub-watchdog", daemon=True)
        self._thread.start()
        # its own thread: a model reload (7-10 s on 2 cores) must not hold up reclaiming
        self._regions_thread = threading.Thread(target=self._reclaim_loop, name="client-regions", daemon=True)
        self._regions_thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._regions_thread):
            if thread is not None:
                thread.join(timeout=120)

    def _reclaim_loop(self) -> None:
        """Every interval: `regions.reclaim` (a dead client's shared-memory regions), with the operator key."""
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        headers = operator_headers(self.server.operator_key)
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    self.regions.reclaim(client, headers)
                except InferenceServerException as exc:
                    if not self._stop.is_set():
                        log.warning("watchdog: client shared-memory regions: %s", exc.message())
        finally:
            client.close()

    @staticmethod
    def configured_stubs(config: dict[str, Any], gpus: int | None = None) -> int:
        """Python backend stubs a model config (JSON) asks for: `count` per group, times the GPUs of a
        KIND_GPU group (its `gpus` list, else every GPU: `gpus`, default the /dev/nvidiaN devices)."""
        if config.get("backend") != "python":
            return 0
        if gpus is None:
            gpus = len([d for d in Path("/dev").glob("nvidia[0-9]*")])
        total = 0
        for group in config.get("instance_group", []):
            count = int(group.get("count", 1))
            if group.get("kind", "KIND_GPU") == "KIND_GPU":
                count *= len(group.get("gpus", [])) or max(gpus, 1)
            total += count
        return total

    @staticmethod
    def variable_size(config: dict[str, Any]) -> bool:
        """Whether a model config (JSON) has a tensor of variable size (a -1 dim): its stub's pool grows
        with the requests. A network model's windows and logits have fixed dims: its pool stays at
        max_batch_size windows of logits, the working set of every request, and is left alone."""
        tensors = config.get("input", []) + config.get("output", [])
        return any(int(d) < 0 for t in tensors for d in t.get("dims", []))

    def _loop(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        headers = operator_headers(self.server.operator_key)
        client = grpcclient.InferenceServerClient(self.server.grpc_url)
        expected: dict[str, int] = {}
        variable: set[str] = set()
        last_cpu = -1.0
        try:
            while not self._stop.wait(self.interval_s):
                try:
                    index = client.get_model_repository_index(headers=headers, as_json=True).get("models", [])
                    ready = {m["name"] for m in index if m.get("state") == "READY"}
                    for model in ready - set(expected):
                        config = client.get_model_config(model, as_json=True)["config"]
                        expected[model] = self.configured_stubs(config)
                        if self.variable_size(config):
                            variable.add(model)
                    pids = self.server.pids()
                    stubs = stubs_of(pids)
                    counts = {m: sum(1 for s in stubs if s.model == m) for m in ready}
                    expected = {m: n for m, n in expected.items() if m in ready}
                    for model in sorted(m for m in ready if counts[m] < expected[m]):
                        self._reload(client, headers, model, "a Python backend stub died")
                        expected.pop(model, None)
                    cpu, last_cpu = last_cpu, cpu_seconds(pids)
                    if 0 <= last_cpu - cpu < 0.1:
                        large = {s.model for s in stubs if resident_bytes(s.region) > self.max_idle_pool_bytes}
                        for model in sorted(large & ready & variable):
                            self._reload(client, headers, model, "its idle stub holds a large shared-memory pool")
                            last_cpu = -1.0
                except InferenceServerException as exc:
                    if not self._stop.is_set():
                        log.warning("watchdog: %s", exc.message())
        finally:
            client.close()

    def _reload(self, client: Any, headers: dict[str, str], model: str, why: str) -> None:
        from tritonclient.utils import InferenceServerException

        if self._stop.is_set():
            return
        log.warning("watchdog: reloading %s: %s", model, why)
        started = time.monotonic()
        try:
            config = client.get_model_config(model, as_json=True)["config"]
            parameters = config.setdefault("parameters", {})
            generation = int(parameters.get(RELOAD_PARAMETER, {}).get("string_value") or 0) + 1
            parameters[RELOAD_PARAMETER] = {"string_value": str(generation)}
            client.load_model(model, config=json.dumps(config), headers=headers)
        except InferenceServerException as exc:
            log.error("watchdog: reloading %s failed (%s); the server now reports not ready", model, exc.message())
            return
        took = time.monotonic() - started
        self.reloads.append((model, why, took))
        log.warning("watchdog: %s reloaded in %.1f s", model, took)
