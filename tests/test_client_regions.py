"""Nothing left on the server when a client goes away: region names that name their owner, the
launcher's watchdog reclaiming the regions of dead clients (SIGKILL, SIGINT/SIGTERM mid-request),
`SegmentationClient.abort()` from another thread, and a live client's region left alone."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client import SegmentationClient, SegmentationError
from wholebody.client_regions import (
    PREFIX,
    ClientRegion,
    Owner,
    owner_is_gone,
    parse_region_name,
    pid_namespace,
    region_name,
    start_ticks,
    this_process,
)
from wholebody.contract import REPO_ROOT
from wholebody.health import answered_requests
from wholebody.sample_data import synthetic_ct
from wholebody.triton_server import LocalTritonServer
from wholebody.triton_server.regions import ClientRegionReclaimer

log = logging.getLogger(__name__)

INTERVAL_S = 2.0  # the watchdog's interval (LocalTritonServer.start_watchdog)
# A CT whose highres request runs long enough to kill its client mid-way: 160^3 int16 at 1.5 mm, 8 windows,
# 10-45 s with the tests' network on 2 shared cores (measured); its regions: 7.8 + 3.9 MiB.
LONG_CT = 160
# Reclaimed within one interval of the request's end; allowed: two intervals and slack for a busy box.
BOUND_AFTER_REQUEST_S = 2 * INTERVAL_S + 1.0


# --- names ---------------------------------------------------------------------------------------
def test_a_name_carries_its_owner_and_parses_back() -> None:
    me = this_process()
    assert me.pid == os.getpid() and me.start_ticks > 0 and me.namespace == pid_namespace() > 0
    for role in ("in", "out"):
        name = region_name(me, 7, role)
        assert name.startswith(f"{PREFIX}_{os.getpid()}_") and "/" not in name and len(name) < 255
        assert parse_region_name(name) == ClientRegion(me, 7, role)
    widest = region_name(Owner(4_194_304, 2**64 - 1, 2**64 - 1), 2**64 - 1, "out")
    assert len(widest) < 110 and parse_region_name(widest) is not None
    with pytest.raises(ValueError):
        region_name(me, 0, "both")
    assert not owner_is_gone(me)


@pytest.mark.parametrize(
    "name",
    [
        "wholebody_client_123_0_in",  # the old names: no start time, no namespace
        "wholebody_client_123_4_5_6_inout",
        "wholebody_client_0123_4_5_6_in",  # not canonical
        "wholebody_client_123_4_5_6_in/x",
        "xwholebody_client_123_4_5_6_in",
        "wholebody_1234_abcd_preprocess_0_0",  # a Python backend stub's pool
        "perf_hardening_123",
        "",
    ],
)
def test_foreign_names_are_not_client_regions(name: str) -> None:
    assert parse_region_name(name) is None


@pytest.fixture
def dead_child() -> Iterator[Callable[[], Owner]]:
    """Starts a child, returns a function that kills and reaps it and gives its Owner as it was."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ticks = start_ticks(child.pid)
        assert ticks is not None
        owner = Owner(child.pid, ticks, pid_namespace())
        assert not owner_is_gone(owner)

        def kill() -> Owner:
            child.kill()
            child.wait()
            return owner

        yield kill
    finally:
        child.kill()
        child.wait()


def test_a_dead_owner_is_gone_and_a_reused_pid_is_not_the_owner(dead_child: Callable[[], Owner]) -> None:
    owner = dead_child()
    assert owner_is_gone(owner)
    me = this_process()
    assert owner_is_gone(Owner(me.pid, me.start_ticks + 1, me.namespace))  # our pid, another start: reused
    assert not owner_is_gone(me)


def test_a_zombie_owner_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = start_ticks(child.pid)
    assert ticks is not None
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    try:
        assert owner_is_gone(Owner(child.pid, ticks, pid_namespace()))  # exited, not reaped yet
    finally:
        child.wait()


def test_an_owner_of_another_namespace_or_unknown_is_never_gone(dead_child: Callable[[], Owner]) -> None:
    owner = dead_child()
    assert not owner_is_gone(Owner(owner.pid, owner.start_ticks, owner.namespace + 1))
    assert not owner_is_gone(Owner(owner.pid, 0, 0))
    assert not owner_is_gone(owner, namespace=owner.namespace + 1)  # judged from another container


class FakeServer:
    """The two shared-memory calls of tritonclient.grpc.InferenceServerClient, over a dict of regions."""

    def __init__(self, regions: dict[str, str], in_use: set[str] | None = None) -> None:
        self.regions = {name: {"name": name, "key": key, "byte_size": "4096"} for name, key in regions.items()}
        self.in_use = set(in_use or ())
        self.unregistered: list[str] = []

    def get_system_shared_memory_status(self, headers: Any = None, as_json: bool = False) -> dict[str, Any]:
        return {"regions": dict(self.regions)} if self.regions else {}

    def unregister_system_shared_memory(self, name: str = "", headers: Any = None) -> None:
        if name in self.in_use:
            raise InferenceServerException(f"Cannot unregister shared memory region '{name}', it is currently in use.")
        self.regions.pop(name, None)
        self.unregistered.append(name)


def test_the_reclaimer_touches_only_dead_owners_of_its_namespace(
    dead_child: Callable[[], Owner], tmp_path: Path
) -> None:
    dead, me = dead_child(), this_process()
    elsewhere = Owner(dead.pid, dead.start_ticks, dead.namespace + 1)
    names = {
        "dead_in": region_name(dead, 0, "in"),
        "dead_out": region_name(dead, 0, "out"),
        "dead_other_key": region_name(dead, 1, "in"),
        "live": region_name(me, 0, "in"),
        "elsewhere": region_name(elsewhere, 0, "in"),
        "old": "wholebody_client_999999_0_in",
        "perf": "perf_hardening_1",
    }
    keys = {name: f"/{name}" for name in names.values()}
    keys[names["dead_other_key"]] = "/wholebody_1234_abcd_preprocess_0_0"  # a key that is not its name
    for path in [*keys.values(), "/" + region_name(dead, 2, "in")]:  # the last: created, never registered
        (tmp_path / path.lstrip("/")).write_bytes(b"x")
    fake = FakeServer(keys, in_use={names["dead_out"]})
    reclaimer = ClientRegionReclaimer(shm_dir=tmp_path)
    assert reclaimer.reclaim(fake) == sorted([names["dead_in"], names["dead_other_key"]])
    left = {p.name for p in tmp_path.iterdir()}
    # files of the dead owner removed (also the in-use one's and the unregistered one); the region whose key is
    # not its own name is unregistered but the file its key names is not touched
    assert left == {names[k] for k in ("live", "elsewhere", "old", "perf")} | {"wholebody_1234_abcd_preprocess_0_0"}
    assert set(fake.regions) == {names[k] for k in ("dead_out", "live", "elsewhere", "old", "perf")}
    fake.in_use.clear()  # the request using it ended: the next pass reclaims it
    assert reclaimer.reclaim(fake) == [names["dead_out"]]
    assert reclaimer.reclaim(fake) == []
    assert [name for name, _ in reclaimer.reclaimed] == sorted([names["dead_in"], names["dead_other_key"]]) + [
        names["dead_out"]
    ]


# --- a client that goes away mid-request, against the session server (watchdog on) ------------------
CHILD = r'''
import json, os, signal, sys, threading, time
import numpy as np
from client import SegmentationClient, SegmentationError
from wholebody.sample_data import synthetic_ct

url, mode, side = sys.argv[1], sys.argv[2], int(sys.argv[3])
ct = synthetic_ct((side, side, side), (1.5, 1.5, 1.5), seed=3)
image = np.asarray(ct.dataobj)

def report(event, **fields):
    files = sorted(f for f in os.listdir("/dev/shm") if f.startswith(f"wholebody_client_{os.getpid()}_"))
    print(json.dumps({"event": event, "t": time.monotonic(), "files": files, **fields}), flush=True)

# Ctrl-C and SIGTERM raise KeyboardInterrupt in the main thread (also when started with SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGTERM, signal.default_int_handler)
seg = SegmentationClient(url)
if mode == "abort":
    def abort_on_a_line():
        sys.stdin.readline()
        seg.abort()
        report("aborted")
    threading.Thread(target=abort_on_a_line, daemon=True).start()
report("sending")
try:
    seg.segment(image, ct.affine, resolution="highres")
    report("finished")
except KeyboardInterrupt:
    report("interrupted")
    seg.abort()  # as the CLI does: exit without waiting for the server
except SegmentationError as exc:
    report("error", message=str(exc), retryable=exc.retryable)
started = time.monotonic()
seg.close()
report("closed", took=time.monotonic() - started)
if mode == "abort":
    try:
        seg.segment(image, ct.affine)
    except SegmentationError as exc:
        report("again", message=str(exc), retryable=exc.retryable)
'''


def server_regions(url: str) -> dict[str, int]:
    """{name: bytes} of the client regions registered on the server."""
    status = grpcclient.InferenceServerClient(url).get_system_shared_memory_status(as_json=True)
    return {n: int(r["byte_size"]) for n, r in status.get("regions", {}).items() if n.startswith(PREFIX)}



def files_of(pid: int) -> list[str]:
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(f"{PREFIX}_{pid}_"))


class Child:
    """A client process (CHILD) sending LONG_CT; its JSON lines as events."""

    def __init__(self, url: str, mode: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, url, mode, str(LONG_CT)], cwd=REPO_ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,  # its own group: killpg
        )
        self.url = url
        self.finished_before = answered_requests(url)
        self.events: dict[str, dict[str, Any]] = {}

    def read(self, event: str) -> dict[str, Any]:
        assert self.process.stdout is not None
        while event not in self.events:
            line = self.process.stdout.readline()
            assert line, f"the client exited ({self.process.wait()}) before {event!r}: {self.events}"
            record = json.loads(line)
            self.events[record["event"]] = record
        return self.events[event]

    def wait_in_flight(self) -> list[str]:
        """Wait until its two regions are registered and the request has run 2 s; their names."""
        self.read("sending")
        deadline = time.monotonic() + 60
        mine = f"{PREFIX}_{self.process.pid}_"
        while len(regions := [n for n in server_regions(self.url) if n.startswith(mine)]) < 2:
            assert time.monotonic() < deadline, "the client's regions were never registered"
            time.sleep(0.05)
        time.sleep(2.0)
        assert answered_requests(self.url) == self.finished_before, f"{LONG_CT}^3 finished too early"
        return regions

    def wait_reclaimed(self, regions: list[str], since: float) -> tuple[float, float]:
        """Poll until the server holds none of `regions` and /dev/shm none of the child's files.

        Returns (seconds from `since` to gone, seconds from the end of the request to gone)."""
        deadline = time.monotonic() + 300
        ended = None
        while True:
            now = time.monotonic()
            if ended is None and answered_requests(self.url) > self.finished_before:
                ended = now
            if not set(regions) & set(server_regions(self.url)) and not files_of(self.process.pid):
                break
            assert now < deadline, f"regions {regions} still registered 300 s after {since:.1f}"
            time.sleep(0.1)
        gone = time.monotonic()
        ended = gone if ended is None else ended  # unregistered before the request had ended (not in use)
        return gone - since, gone - ended

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()


@pytest.fixture
def child_factory(server: LocalTritonServer) -> Iterator[Callable[[str], Child]]:
    children: list[Child] = []

    def start(mode: str) -> Child:
        children.append(Child(server.grpc_url, mode))
        return children[-1]

    yield start
    for child in children:
        child.close()


def test_a_client_killed_mid_request_leaves_nothing_on_the_server(child_factory: Callable[[str], Child]) -> None:
    child = child_factory("kill")
    regions = child.wait_in_flight()
    pid = child.process.pid
    os.killpg(pid, signal.SIGKILL)  # the client and its resource tracker: nothing of it unlinks its files
    killed = time.monotonic()
    child.process.wait()
    files_deadline = killed + INTERVAL_S + 3.0
    while files_of(pid) and time.monotonic() < files_deadline:
        time.sleep(0.05)
    files_gone = time.monotonic() - killed
    assert not files_of(pid), f"the killed client's /dev/shm files are still there after {files_gone:.1f} s"
    after_kill, after_request = child.wait_reclaimed(regions, killed)
    print(f"SIGKILL: files gone {files_gone:.1f} s after the kill; regions gone {after_kill:.1f} s after the kill, "
          f"{after_request:.1f} s after the request ended")
    assert after_request < BOUND_AFTER_REQUEST_S


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_in_segment_cleans_up_at_once_and_the_server_after_exit(
    child_factory: Callable[[str], Child], signum: int
) -> None:
    child = child_factory("signal")
    regions = child.wait_in_flight()
    sent = time.monotonic()
    os.kill(child.process.pid, signum)
    interrupted = child.read("interrupted")
    assert interrupted["t"] - sent < 2.0, f"KeyboardInterrupt {interrupted['t'] - sent:.2f} s after the signal"
    assert interrupted["files"] == []  # the client's own files are unlinked before the exception goes on
    assert child.read("closed")["took"] < 1.0  # aborted: close() does not wait for the server
    assert child.process.wait(timeout=30) == 0
    after_signal, after_request = child.wait_reclaimed(regions, sent)
    print(f"{signal.Signals(signum).name}: interrupted after {interrupted['t'] - sent:.2f} s; regions gone "
          f"{after_signal:.1f} s after the signal, {after_request:.1f} s after the request ended")
    assert after_request < BOUND_AFTER_REQUEST_S


def test_abort_from_another_thread_cancels_at_once(child_factory: Callable[[str], Child]) -> None:
    child = child_factory("abort")
    regions = child.wait_in_flight()
    assert child.process.stdin is not None
    sent = time.monotonic()
    child.process.stdin.write("abort\n")
    child.process.stdin.flush()
    error = child.read("error")
    assert "cancelled" in error["message"] and error["retryable"] is False
    assert error["t"] - sent < 2.0, f"segment() raised {error['t'] - sent:.2f} s after abort()"
    assert error["files"] == [] and child.read("aborted")["files"] == []
    assert child.read("closed")["took"] < 1.0
    again = child.read("again")
    assert again["message"] == error["message"] and again["retryable"] is False
    assert child.process.wait(timeout=30) == 0
    after_abort, after_request = child.wait_reclaimed(regions, sent)
    print(f"abort(): segment raised after {error['t'] - sent:.2f} s; regions gone {after_abort:.1f} s after "
          f"abort(), {after_request:.1f} s after the request ended")
    assert after_request < BOUND_AFTER_REQUEST_S


def test_abort_before_a_request_refuses_it_without_the_server(server: LocalTritonServer, example_ct: Path) -> None:
    image = nib.load(example_ct)
    seg = SegmentationClient(server.grpc_url, use_shared_memory=False)
    seg.abort()
    seg.abort()  # idempotent
    with pytest.raises(SegmentationError, match="cancelled") as info:
        seg.segment(np.asarray(image.dataobj), image.affine, resolution="lowres")
    assert not info.value.retryable and seg.aborted
    assert seg.label_names()[0] == "background"  # metadata calls still work
    started = time.monotonic()
    seg.close()
    assert time.monotonic() - started < 1.0


def test_a_live_clients_regions_are_never_reclaimed(server: LocalTritonServer, dead_child: Callable[[], Owner]) -> None:
    """A region of this (live) process, one of a dead owner in another pid namespace and one of the
    old naming survive several watchdog intervals, unused and registered."""
    dead = dead_child()
    names = [
        region_name(this_process(), 10_000, "in"),
        region_name(Owner(dead.pid, dead.start_ticks, dead.namespace + 1), 0, "in"),
        f"{PREFIX}_{dead.pid}_0_in",
    ]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    created = []
    try:
        for name in names:
            created.append(shared_memory.SharedMemory(name, create=True, size=4096))
            client.register_system_shared_memory(name, f"/{name}", 4096)
        time.sleep(3 * INTERVAL_S + 0.5)
        assert set(names) <= set(server_regions(server.grpc_url))
        assert all((Path("/dev/shm") / name).exists() for name in names)
    finally:
        for name in names:
            client.unregister_system_shared_memory(name)
        for memory in created:
            memory.close()
            memory.unlink()


def test_the_cli_stopped_by_sigterm_says_how_to_resume_and_leaves_nothing(
    server: LocalTritonServer, tmp_path: Path
) -> None:
    """`kill` (SIGTERM, what systemd and Kubernetes send) to `python -m client` mid-request: it exits 143 at
    once with the resume line, its /dev/shm files and its -o lock gone; the server's regions after the
    request ends; the rerun segments the scan."""
    ct = tmp_path / "cohort" / "ct.nii.gz"
    ct.parent.mkdir()
    nib.save(synthetic_ct((LONG_CT, LONG_CT, LONG_CT), (1.5, 1.5, 1.5), seed=3), ct)
    out = tmp_path / "labels"
    command = [sys.executable, "-m", "client", str(ct.parent), "-o", str(out), "-u", server.grpc_url,
               "--resolution", "highres"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        mine = f"{PREFIX}_{process.pid}_"
        deadline = time.monotonic() + 60
        while len(regions := [n for n in server_regions(server.grpc_url) if n.startswith(mine)]) < 2:
            assert time.monotonic() < deadline and process.poll() is None, "the CLI never registered its regions"
            time.sleep(0.05)
        time.sleep(1.0)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr
    assert took < 5.0, f"the CLI took {took:.1f} s to stop"
    assert "stopped by SIGTERM; requests in flight cancelled, finished scans kept: rerun the same command" in stderr
    assert files_of(process.pid) == [] and not (out / ".segmentation.lock").exists()
    assert not list(out.rglob("*.nii.gz"))
    deadline = time.monotonic() + 300
    while set(regions) & set(server_regions(server.grpc_url)):
        assert time.monotonic() < deadline, "the stopped CLI's regions are still registered"
        time.sleep(0.1)
    print(f"SIGTERM: the CLI exited {took:.2f} s after the signal")
