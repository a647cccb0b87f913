"""What the client's memory peaks at while it segments a large CT, against the size of the volume.

    python -m perf.client_memory                              # this working tree, a 512x512x1200 int16 CT
    python -m perf.client_memory --ref main --plain           # and `main` beside it; .nii.gz and .nii inputs
    python -m perf.client_memory --shape 512,512,600 --repeats 3 --work-dir /tmp/cm --keep

Issue 20, item 5 asks that the client's peak stay within 2x the volume (X*Y*Z*2 bytes of int16) on a
512x512x1200 CT. This measures it end to end: one local tritonserver (CPU, the test bundle's small
network, watchdog on, as tests/conftest.py starts it, with size limits raised for the CT) on loopback,
and `python -m client CT -o OUT -u URL --resolution lowres -q` in a fresh interpreter per run, whose
own peak RSS (`ru_maxrss` from os.wait4, shared-memory pages it touched included) is the number.
`--ref` exports that commit with `git archive` (as perf/client_footprint.py does) and runs its client
against the same server and CT, rounds alternating the trees; the label maps of all runs must be
equal (same server, same CT), and the output says whether they are. `python -c "import client"` in
each tree is the floor. Everything goes under the work directory (a temporary one unless
`--work-dir`), children's .pyc files and the server log included; what this run made there is removed
at the end unless `--keep` (a bundle, repository or CT kept by an earlier `--keep` run is reused).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from perf.client_footprint import REPO_ROOT, Tree, export_ref, machine, working_tree

if TYPE_CHECKING:
    from wholebody.triton_server import LocalTritonServer  # imports torch: at run time only where needed

log = logging.getLogger("perf.client_memory")

DEFAULT_SHAPE = (512, 512, 1200)
DEFAULT_SPACING = (0.7, 0.7, 1.0)
INIT_FILTERS = 8  # the tests' small network (tests/conftest.py)
MAX_INPUT_VOXELS = 2**29
MAX_RESAMPLED_VOXELS = 2**28
GIB = 2**30


@dataclasses.dataclass
class Run:
    """One measured child: its peak RSS (bytes), wall seconds, exit code and label map digest."""

    peak_rss: int
    wall_s: float
    exit_code: int
    timed_out: bool = False
    digest: str | None = None
    stderr_tail: str = ""


@dataclasses.dataclass
class Cell:
    """The runs of one tree on one input file."""

    tree: Tree
    ct: Path
    runs: list[Run] = dataclasses.field(default_factory=list)


def parse_triple(text: str, kind: Callable[[str], Any]) -> tuple[Any, Any, Any]:
    """'512,512,1200' -> (512, 512, 1200) with `kind` applied to each of the three values."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated values, got {text!r}")
    try:
        values = (kind(parts[0]), kind(parts[1]), kind(parts[2]))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
    return values


class WorkDir:
    """The work directory and the entries this run made in it (removed by `clean` unless kept)."""

    def __init__(self, given: Path | None) -> None:
        self.temporary = given is None
        self.root = Path(tempfile.mkdtemp(prefix="client-memory-")) if given is None else given.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.made: list[Path] = []

    def cached(self, name: str, key: dict[str, object], build: Callable[[Path], object]) -> Path:
        """`root/name`, reused when its stamp says it was built with `key`, else (re)built by `build`."""
        path = self.root / name
        stamp = self.root / f".{name}.stamp"
        wanted = json.dumps(key, sort_keys=True)
        if path.exists() and stamp.exists() and stamp.read_text() == wanted:
            log.info("reusing %s", path)
            return path
        self.remove(path)
        stamp.unlink(missing_ok=True)
        self.made += [path, stamp]
        build(path)
        stamp.write_text(wanted)
        return path

    def new(self, name: str) -> Path:
        """A fresh entry `root/name` (an old one removed) that this run owns."""
        path = self.root / name
        self.remove(path)
        self.made.append(path)
        return path

    @staticmethod
    def remove(path: Path) -> None:
        """Remove a file or a folder tree, if there."""
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    def clean(self) -> None:
        """Remove a temporary work dir whole; in a given one, only what this run made."""
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        for path in reversed(self.made):
            self.remove(path)


def child_env(tree: Tree, pycache: Path) -> dict[str, str]:
    """This environment with PYTHONPATH = the tree only and .pyc files written, under `pycache` (as an
    installed client has them, whatever PYTHONDONTWRITEBYTECODE says here)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPATH"] = str(tree.root)
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def check_tree(python: str, tree: Tree, pycache: Path) -> None:
    """Make sure `import client` and `python -m client` in `tree` find that tree's client."""
    code = "import client, client.__main__ as m; print(client.__file__); print(m.__file__)"
    found = subprocess.run([python, "-c", code], cwd=tree.root, env=child_env(tree, pycache), capture_output=True,
                           text=True, check=True).stdout.split()
    for path in found:
        if not Path(path).resolve().is_relative_to(tree.root.resolve()):
            raise RuntimeError(f"{tree.label}: the client is imported from {path}, not from {tree.root}")


def measure(argv: list[str], cwd: str, env: dict[str, str], stderr_path: str, timeout_s: float) -> Run:
    """Run `argv`; its own peak RSS, wall time and exit code. Call it in a lean process (`Spawner`).

    Past `timeout_s` the child gets SIGTERM (the client cancels its request and exits 143), then SIGKILL.
    """
    with open(stderr_path, "wb") as stderr:
        start = time.perf_counter()
        child = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    expired = threading.Event()

    def stop() -> None:
        expired.set()
        for sig, grace in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 0.0)):
            if child.returncode is not None:
                return
            try:
                os.kill(child.pid, sig)
            except ProcessLookupError:
                return
            time.sleep(grace)

    timer = threading.Timer(timeout_s, stop)
    timer.daemon = True
    timer.start()
    try:
        _, status, usage = os.wait4(child.pid, 0)
    finally:
        timer.cancel()
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: keep Popen from waiting again
    tail = Path(stderr_path).read_text(errors="replace")[-2000:] if child.returncode else ""
    return Run(peak_rss=usage.ru_maxrss * 1024, wall_s=wall, exit_code=child.returncode,  # ru_maxrss: KiB
               timed_out=expired.is_set(), stderr_tail=tail)


def serve_measurements() -> None:
    """The Spawner's loop: one JSON request per stdin line, one JSON Run per stdout line, until EOF."""
    for line in sys.stdin:
        request = json.loads(line)
        run = measure(request["argv"], request["cwd"], request["env"], request["stderr"], request["timeout_s"])
        print(json.dumps(dataclasses.asdict(run)), flush=True)


class Spawner:
    """A lean helper process that starts the measured children and reaps them with os.wait4.

    A child's ru_maxrss starts at the resident size of the process it was forked from: the kernel keeps
    the high-water mark of the memory it had before exec. Forked from this process, which holds torch,
    the server's handles and (for a while) the CT, `python -c pass` reads ~0.25 GiB. The helper is a
    fresh interpreter of ~20 MiB, started before any of that, so the children's numbers are their own
    (give or take the helper's size, which the floor row shows).
    """

    def __init__(self, python: str = sys.executable) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        env["PYTHONPATH"] = str(REPO_ROOT)
        self.process = subprocess.Popen(
            [python, "-c", "from perf.client_memory import serve_measurements; serve_measurements()"],
            cwd=REPO_ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def measure(self, python: str, args: list[str], tree: Tree, pycache: Path, stderr_path: Path,
                timeout_s: float) -> Run:
        """Run `python *args` in `tree` (PYTHONPATH and cwd) from the helper; see `measure`."""
        assert self.process.stdin is not None and self.process.stdout is not None
        request = {"argv": [python, *args], "cwd": str(tree.root), "env": child_env(tree, pycache),
                   "stderr": str(stderr_path), "timeout_s": timeout_s}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the measuring helper exited with code {self.process.wait()}")
        return Run(**json.loads(answer))

    def close(self) -> None:
        """End the helper (EOF on its stdin), killing it after a minute."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def write_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], folder: Path, plain: bool) -> list[Path]:
    """The synthetic int16 CT as folder/ct.nii.gz (and folder/ct.nii with `plain`)."""
    import nibabel as nib
    import numpy as np

    from wholebody.sample_data import synthetic_ct

    folder.mkdir(parents=True)
    image = synthetic_ct(shape=shape, spacing=spacing, seed=0)
    if image.get_data_dtype() != np.int16 or np.asanyarray(image.dataobj).dtype != np.int16:
        log.warning("synthetic_ct gave %s voxels; casting to int16", np.asanyarray(image.dataobj).dtype)
        image = nib.Nifti1Image(np.asanyarray(image.dataobj).astype(np.int16), image.affine)
    image.set_data_dtype(np.int16)
    log.info("CT: %s voxels of %s, %.2f GiB", "x".join(map(str, shape)), np.asanyarray(image.dataobj).dtype,
             np.asanyarray(image.dataobj).nbytes / GIB)
    image.header.set_xyzt_units("mm", "sec")
    paths = [folder / "ct.nii.gz"] + ([folder / "ct.nii"] if plain else [])
    for path in paths:
        log.info("writing %s", path)
        nib.save(image, path)
    return paths


def label_map_digest(out: Path) -> str:
    """SHA-256 of the one label map in `out`: its shape, dtype, voxels (C order) and affine."""
    import nibabel as nib
    import numpy as np

    maps = sorted(p for p in out.iterdir() if p.name.startswith("ct_seg.nii"))
    if len(maps) != 1:
        raise RuntimeError(f"{out} holds {len(maps)} label maps, expected one")
    image = nib.load(maps[0])
    voxels = np.ascontiguousarray(np.asanyarray(image.dataobj))
    digest = hashlib.sha256(f"{voxels.shape} {voxels.dtype}".encode())
    digest.update(memoryview(voxels).cast("B"))
    digest.update(np.ascontiguousarray(image.affine, dtype=np.float64).tobytes())
    return digest.hexdigest()


def start_server(repo: Path, log_path: Path, pycache: Path) -> LocalTritonServer:
    """One LocalTritonServer on loopback with the watchdog, as tests/conftest.py starts it."""
    from wholebody.triton_server import LocalTritonServer

    server = LocalTritonServer(model_repository=repo, watchdog=True, log_path=log_path)
    previous = os.environ.get("PYTHONPYCACHEPREFIX")
    os.environ["PYTHONPYCACHEPREFIX"] = str(pycache)  # the stubs' .pyc files stay in the work dir too
    try:
        return server.start()
    finally:
        if previous is None:
            os.environ.pop("PYTHONPYCACHEPREFIX", None)
        else:
            os.environ["PYTHONPYCACHEPREFIX"] = previous


def build_repository(path: Path, bundle: Path, max_input: int, max_resampled: int) -> None:
    """A copy of the model repository at `path` with `bundle` installed and the given size limits."""
    from wholebody.bundle import copy_model_repository, install_bundle
    from wholebody.validation import write_size_limits

    copy_model_repository(path)
    install_bundle(bundle, path)
    write_size_limits(path, max_input, max_resampled)


def gib(n: float) -> str:
    """Bytes as GiB, two decimals."""
    return f"{n / GIB:.2f}"


def table(cells: list[Cell], floors: dict[str, list[Run]], volume_bytes: int, where: str, shape: tuple[int, ...],
          spacing: tuple[float, ...], resolution: str, python: str, repeats: int) -> str:
    """The medians as a markdown table: one row per tree and input file."""
    lines = [
        f"Client peak memory on {where} (at the start)",
        f"CT: {'x'.join(map(str, shape))} int16 at {'x'.join(map(str, spacing))} mm = {gib(volume_bytes)} GiB "
        f"of voxels; --resolution {resolution}; test network (init_filters={INIT_FILTERS}) on one local "
        "tritonserver (CPU); interpreter: " + python,
        f"median of {repeats} run(s) per row; peak RSS = the child's ru_maxrss (shared-memory pages included)",
        "",
        "| client tree | input | peak RSS GiB | peak / volume | (peak - import floor) / volume | wall s | "
        "exit codes |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for cell in cells:
        peak = statistics.median(r.peak_rss for r in cell.runs)
        floor = statistics.median(r.peak_rss for r in floors[cell.tree.label])
        wall = statistics.median(r.wall_s for r in cell.runs)
        codes = ",".join(str(r.exit_code) + (" (timed out)" if r.timed_out else "") for r in cell.runs)
        lines.append(f"| {cell.tree.label} | {cell.ct.name} | {gib(peak)} | {peak / volume_bytes:.2f} | "
                     f"{(peak - floor) / volume_bytes:.2f} | {wall:.1f} | {codes} |")
    for label, runs in floors.items():
        floor = statistics.median(r.peak_rss for r in runs)
        lines.append(f"| {label} | (python -c \"import client\": the floor) | {gib(floor)} | "
                     f"{floor / volume_bytes:.2f} | | {statistics.median(r.wall_s for r in runs):.1f} | "
                     f"{','.join(str(r.exit_code) for r in runs)} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line (kebab-case flags; the module docstring's examples as epilog)."""
    parser = argparse.ArgumentParser(prog="python -m perf.client_memory", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--shape", type=lambda s: parse_triple(s, int), default=DEFAULT_SHAPE,
                        help="CT shape X,Y,Z (default: 512,512,1200)")
    parser.add_argument("--spacing", type=lambda s: parse_triple(s, float), default=DEFAULT_SPACING,
                        help="voxel spacing in mm (default: 0.7,0.7,1.0)")
    parser.add_argument("--resolution", default="lowres", choices=["lowres", "highres"],
                        help="the client's --resolution (default: lowres)")
    parser.add_argument("--ref", help="also measure the client of this git commit/branch, exported beside this tree")
    parser.add_argument("--repeats", type=int, default=1, help="measured runs per tree and input (default: 1)")
    parser.add_argument("--plain", action="store_true", help="also measure an uncompressed .nii of the same CT")
    parser.add_argument("--work-dir", type=Path, help="where everything goes (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep what this run made in the work dir")
    parser.add_argument("--timeout", type=float, default=900.0, metavar="SECONDS",
                        help="stop a client run after this long (SIGTERM, then SIGKILL; default: 900)")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the clients (default: this one)")
    return parser


def prepare(work: WorkDir, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The model repository (test bundle installed, size limits raised) and the CT file(s), built or reused."""
    from wholebody.bundle import make_test_bundle  # torch: only once the arguments are good

    bundle = work.cached("bundle", {"init_filters": INIT_FILTERS, "seed": 0},
                         lambda p: make_test_bundle(p, init_filters=INIT_FILTERS, seed=0))
    limits = [MAX_INPUT_VOXELS, MAX_RESAMPLED_VOXELS]
    repo = work.cached("model_repository", {"bundle": str(bundle), "init_filters": INIT_FILTERS, "limits": limits},
                       lambda p: build_repository(p, bundle, *limits))
    ct_key = {"shape": list(args.shape), "spacing": list(args.spacing), "seed": 0, "plain": args.plain}
    ct_dir = work.cached("ct", ct_key, lambda p: write_ct(args.shape, args.spacing, p, args.plain))
    return repo, [ct_dir / "ct.nii.gz"] + ([ct_dir / "ct.nii"] if args.plain else [])


def run_rounds(
    args: argparse.Namespace, spawner: Spawner, server: LocalTritonServer, trees: list[Tree], cts: list[Path],
    work: WorkDir, pycache: Path, volume_bytes: int,
) -> tuple[list[Cell], dict[str, list[Run]]]:
    """`args.repeats` rounds, the trees alternating: each round the floor of each tree, then each CT by each tree."""
    outputs, logs = work.new("out"), work.root / "logs"
    for tree in trees:  # warm-up, not counted: writes the .pyc files of the CLI's whole import
        spawner.measure(args.python, ["-m", "client", "--help"], tree, pycache, logs / "warmup.stderr", 120)
    floors: dict[str, list[Run]] = {t.label: [] for t in trees}
    cells = [Cell(tree, ct) for ct in cts for tree in trees]
    for round_ in range(args.repeats):
        order = trees if round_ % 2 == 0 else list(reversed(trees))
        for tree in order:
            floors[tree.label].append(
                spawner.measure(args.python, ["-c", "import client"], tree, pycache, logs / "floor.stderr", 120))
        for ct in cts:
            for tree in order:
                cell = next(c for c in cells if c.tree is tree and c.ct == ct)
                out = outputs / f"tree{trees.index(tree)}-{ct.name}-round{round_ + 1}"
                server.wait_lean(120)  # every run starts on an idle, lean server
                command = ["-m", "client", str(ct), "-o", str(out), "-u", server.grpc_url,
                           "--resolution", args.resolution, "-q"]
                log.info("round %d of %d: %s on %s", round_ + 1, args.repeats, tree.label, ct.name)
                run = spawner.measure(args.python, command, tree, pycache, logs / f"{out.name}.stderr",
                                      args.timeout)
                if run.exit_code == 0:
                    run.digest = label_map_digest(out)
                log.info("  exit %d, peak RSS %s GiB (%.2f x the volume), %.1f s%s", run.exit_code,
                         gib(run.peak_rss), run.peak_rss / volume_bytes, run.wall_s,
                         f"\n{run.stderr_tail}" if run.exit_code else "")
                cell.runs.append(run)
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)  # label maps are large
    return cells, floors


def compare_label_maps(cells: list[Cell]) -> tuple[bool, str]:
    """Whether every run gave one and the same label map, and a line (or lines) saying so."""
    runs = [r for c in cells for r in c.runs]
    failed = [r for r in runs if r.exit_code != 0]
    done = {r.digest for r in runs if r.digest is not None}
    lines = [f"Label maps: not compared in full: {len(failed)} of {len(runs)} run(s) failed."] if failed else []
    if len(done) == 1:
        trees = list(dict.fromkeys(c.tree.label for c in cells))
        inputs = list(dict.fromkeys(c.ct.name for c in cells))
        lines.append(f"Label maps: equal. All {len(runs) - len(failed)} successful runs ({'; '.join(trees)}; "
                     f"{', '.join(inputs)}) gave the same label map "
                     f"(sha256 of voxels and affine {next(iter(done))[:16]}).")
    elif done:
        lines.append("Label maps DIFFER (sha256 per run):")
        for cell in cells:
            lines.append(f"  {cell.tree.label}, {cell.ct.name}: {[(r.digest or 'failed')[:16] for r in cell.runs]}")
    else:
        lines.append("Label maps: none to compare (no run succeeded).")
    return len(done) == 1 and not failed, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    voxels = math.prod(args.shape)
    if voxels > MAX_INPUT_VOXELS:
        parser.error(f"--shape has {voxels:,} voxels, above the limit this benchmark gives the server "
                     f"({MAX_INPUT_VOXELS:,})")
    volume_bytes = voxels * 2
    where = machine()
    started = time.monotonic()
    spawner = Spawner()  # first, while this process is small
    work = WorkDir(args.work_dir)
    log.info("work dir: %s", work.root)
    server: LocalTritonServer | None = None
    try:
        pycache = work.new("pycache")
        trees = []
        if args.ref:
            ref_root = work.new("ref")
            ref_root.mkdir()
            trees.append(export_ref(args.ref, ref_root))
        trees.append(working_tree())
        for tree in trees:
            check_tree(args.python, tree, pycache)
        repo, cts = prepare(work, args)
        work.new("logs").mkdir()
        server = start_server(repo, work.root / "logs" / "tritonserver.log", pycache)
        log.info("server up on %s", server.grpc_url)
        cells, floors = run_rounds(args, spawner, server, trees, cts, work, pycache, volume_bytes)
        server.stop()
        server = None
        equal, verdict = compare_label_maps(cells)
        print(table(cells, floors, volume_bytes, where, args.shape, args.spacing, args.resolution, args.python,
                    args.repeats))
        print()
        print(verdict)
        print(f"Ran {time.monotonic() - started:.0f} s in all; work dir {work.root}"
              f"{' (kept)' if args.keep else ' (removed)'}")
        return 0 if equal else 1
    finally:
        spawner.close()
        if server is not None:
            server.stop()
        if not args.keep:
            work.clean()


if __name__ == "__main__":
    sys.exit(main())
