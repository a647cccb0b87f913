"""What the client costs to start: wall time and peak memory of importing it and of its CLI's --help.

    python -m perf.client_footprint                     # this working tree
    python -m perf.client_footprint --ref main          # and the commit `main` beside it, same runs

Each measured command runs in a fresh interpreter (this one, `sys.executable`) with PYTHONPATH and the
working directory set to the tree it measures: (a) `import client`, (b) that plus a size check
(`ServerLimits.check` of a 512x512x400 CT at highres, the check that imported torch and MONAI before
the estimate moved to `wholebody.validation`), (c) `python -m client --help`, and the bare interpreter
as the floor. Wall time is from start to exit; peak RSS is the child's own `ru_maxrss` (os.wait4).
`--ref` exports that commit with `git archive` into a temporary folder. Rounds alternate the trees and
commands after one untimed warm-up each (which also writes the .pyc files), so a drift in the machine's
load hits every column alike; the table gives medians. Standard library only: it runs in a
client-only install too.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("perf.client_footprint")

REPO_ROOT = Path(__file__).resolve().parent.parent

SIZE_CHECK = (
    "import numpy as np\n"
    "import client\n"
    "from client.inputs import Header\n"
    "from client.segmentation_client import ServerLimits\n"
    "ServerLimits(10**9, 10**9, 'highres').check(Header((512, 512, 400), np.diag([0.8, 0.8, 1.0, 1.0])), 'highres')\n"
)
# label -> arguments after the interpreter
COMMANDS: dict[str, list[str]] = {
    "python -c pass (the floor)": ["-c", "pass"],
    "(a) import client": ["-c", "import client"],
    "(b) import + ServerLimits.check": ["-c", SIZE_CHECK],
    "(c) python -m client --help": ["-m", "client", "--help"],
}


@dataclass
class Tree:
    """A source tree to measure: its label in the table and its folder (PYTHONPATH and cwd)."""

    label: str
    root: Path


@dataclass
class Sample:
    wall_s: float
    peak_rss_mib: float


def machine() -> str:
    """CPU model and logical cores (from /proc/cpuinfo), the cores usable here, Python, load average."""
    model, logical = "unknown CPU", 0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
            elif line.startswith("processor"):
                logical += 1
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    python = sys.version.split()[0]
    return f"{model}, {logical or '?'} logical cores ({usable} usable), Python {python}, load average {load}"


def measure(python: str, args: list[str], tree: Tree) -> Sample:
    """Run `python *args` in `tree` and return its wall time and its own peak RSS."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree.root)
    start = time.perf_counter()
    child = subprocess.Popen([python, *args], cwd=tree.root, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    assert child.stderr is not None
    with child.stderr:
        stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: keep Popen from waiting again
    if child.returncode != 0:
        raise RuntimeError(f"{tree.label}: {' '.join(args)[:80]} exited {child.returncode}: {stderr.decode()[-2000:]}")
    return Sample(wall_s=wall, peak_rss_mib=usage.ru_maxrss / 1024)  # ru_maxrss: KiB on Linux


def check_tree(python: str, tree: Tree) -> None:
    """Make sure `import client` in `tree` finds that tree's client (not an installed one)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree.root)
    found = subprocess.run([python, "-c", "import client; print(client.__file__)"], cwd=tree.root, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.root.resolve()):
        raise RuntimeError(f"{tree.label}: `import client` finds {found}, not the tree's own")


def export_ref(ref: str, into: Path) -> Tree:
    """`git archive` of `ref` (this repository) unpacked into `into`."""
    sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", f"{ref}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", sha],
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        if hasattr(tarfile, "data_filter"):  # Python 3.11.4+: refuse links and paths out of `into`
            tar.extractall(into, filter="data")
        else:
            tar.extractall(into)
    return Tree(label=f"{ref} ({sha})", root=into)


def working_tree() -> Tree:
    head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return Tree(label=f"this tree ({head}{', modified' if dirty else ''})", root=REPO_ROOT)


def table(
    trees: list[Tree], results: dict[tuple[str, str], list[Sample]], rounds: int, python: str, where: str
) -> str:
    """The medians as a markdown table, one row per command, wall time and peak RSS per tree."""
    lines = [
        f"Client footprint on {where} (at the start)",
        f"interpreter: {python}; median of {rounds} runs per cell after one warm-up; "
        "peak RSS = the child's ru_maxrss",
        "",
        "| command | " + " | ".join(f"{t.label}: wall s | peak RSS MiB" for t in trees) + " |",
        "|---|" + "---:|---:|" * len(trees),
    ]
    for command in COMMANDS:
        cells = []
        for tree in trees:
            samples = results[(tree.label, command)]
            cells.append(f"{statistics.median(s.wall_s for s in samples):.3f}")
            cells.append(f"{statistics.median(s.peak_rss_mib for s in samples):.0f}")
        lines.append(f"| {command} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.client_footprint", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref", help="also measure this git commit/branch (e.g. main), exported beside this tree")
    parser.add_argument("--rounds", type=int, default=7, help="timed runs per command and tree (default: 7)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to measure with (default: this one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    where = machine()
    with tempfile.TemporaryDirectory(prefix="client-footprint-") as tmp:
        trees = [export_ref(args.ref, Path(tmp))] if args.ref else []
        trees.append(working_tree())
        for tree in trees:
            check_tree(args.python, tree)
        results: dict[tuple[str, str], list[Sample]] = {(t.label, c): [] for t in trees for c in COMMANDS}
        for round_ in range(args.rounds + 1):  # round 0: warm-up (page cache, .pyc files), not counted
            log.info("round %d of %d%s", round_, args.rounds, " (warm-up)" if round_ == 0 else "")
            for command, command_args in COMMANDS.items():
                for tree in trees:
                    sample = measure(args.python, command_args, tree)
                    if round_:
                        results[(tree.label, command)].append(sample)
        print(table(trees, results, args.rounds, args.python, where))
    return 0


if __name__ == "__main__":
    sys.exit(main())
