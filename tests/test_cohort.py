"""The cohort client's logic without a server: discovery, output planning, reading, writing, and the
scheduling of `run_cohort` (retries, resume, manifest) with an in-process segmenter.

The same behaviour against real tritonservers is in tests/test_client.py."""

from __future__ import annotations

import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.cohort import MANIFEST_NAME, CohortOptions, CohortSummary, Record, read_manifest, run_cohort
from client.inputs import NiftiFormat, ScanError, Volume, discover, native_array
from client.outputs import NiftiLabelMapWriter, OutputError, check_output_dir, plan_outputs
from client.segmentation_client import SegmentationError, ServerLimits
from wholebody.sample_data import synthetic_ct

WRITERS = [NiftiLabelMapWriter()]


def small_ct(path: Path, shape: tuple[int, int, int] = (12, 10, 8), seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(synthetic_ct(shape, (3.0, 3.0, 3.0), seed=seed), path)
    return path


@pytest.fixture()
def cohort(tmp_path: Path) -> Path:
    """Case folders with the same file name, an upper-case name, and files that are not scans."""
    root = tmp_path / "cohort"
    small_ct(root / "s0001" / "ct.nii.gz", seed=1)
    small_ct(root / "s0002" / "ct.nii.gz", seed=2)
    small_ct(root / "UPPER.NII.GZ", seed=3)
    small_ct(root / "plain.nii", seed=4)
    raw = (root / "s0001" / "ct.nii.gz").read_bytes()
    (root / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (root / "x.nrrd").write_text("NRRD0004\n")
    (root / "notes.txt").write_text("not an image")
    (root / ".ct.nii.gz.abc.partial").write_bytes(b"")
    return root


def test_discovery_is_recursive_case_insensitive_and_mirrors_folders(cohort: Path) -> None:
    found = discover([cohort])
    assert [str(s.relative) for s in found.scans] == ["UPPER", "plain", "s0001/ct", "s0002/ct", "truncated"]
    assert len(found.problems) == 1 and "x.nrrd: NRRD files are not supported" in found.problems[0]
    # the same file reached twice is one scan; a file given alone keeps its own name
    again = discover([cohort, cohort / "s0001" / "ct.nii.gz"])
    assert len(again.scans) == len(found.scans)
    alone = discover([cohort / "s0002" / "ct.nii.gz"])
    assert [str(s.relative) for s in alone.scans] == ["ct"]
    # two same-named files given as files: their folders keep them apart
    pair = discover([cohort / "s0001" / "ct.nii.gz", cohort / "s0002" / "ct.nii.gz"])
    assert [str(s.relative) for s in pair.scans] == ["s0001/ct", "s0002/ct"]


def test_discovery_reports_what_is_not_a_scan(tmp_path: Path, cohort: Path) -> None:
    (tmp_path / "empty").mkdir()
    found = discover([tmp_path / "missing.nii.gz", tmp_path / "empty", cohort / "notes.txt"])
    assert found.scans == []
    assert [p.split(": ", 1)[1].split(" ")[0] for p in found.problems] == ["no", "folder", "not"]


def test_discovery_skips_the_output_folder(cohort: Path) -> None:
    out = cohort / "labels"
    small_ct(out / "s0001" / "ct_seg.nii.gz")
    assert all("labels" not in str(s.source) for s in discover([cohort], exclude=[out]).scans)


def test_outputs_never_collide_and_never_replace_inputs(cohort: Path, tmp_path: Path) -> None:
    scans = discover([cohort]).scans
    plan = plan_outputs(scans, tmp_path / "out", WRITERS, "_seg")
    names = sorted(str(p[0].relative_to(tmp_path / "out")) for p in plan.values())
    assert names == ["UPPER_seg.nii.gz", "plain_seg.nii", "s0001/ct_seg.nii.gz", "s0002/ct_seg.nii.gz",
                     "truncated_seg.nii.gz"]
    small_ct(cohort / "s0001" / "CT.nii.gz")  # differs only in case: one output on a case-blind disk
    with pytest.raises(OutputError, match="would both be written to"):
        plan_outputs(discover([cohort]).scans, tmp_path / "out", WRITERS, "_seg")
    with pytest.raises(OutputError, match="would replace the input"):
        plan_outputs(discover([cohort / "plain.nii"]).scans, cohort, WRITERS, "")


def test_output_folder_is_checked_first(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(file)
    with pytest.raises(OutputError, match="cannot write there"):
        check_output_dir(file / "below")
    check_output_dir(tmp_path / "new" / "folder")
    assert (tmp_path / "new" / "folder").is_dir() and not list((tmp_path / "new" / "folder").iterdir())


def test_reading_gives_what_nibabel_gives_in_the_type_it_travels_in(cohort: Path) -> None:
    fmt = NiftiFormat()
    for path in (cohort / "UPPER.NII.GZ", cohort / "plain.nii"):
        volume = fmt.read_volume(path)
        expected = nib.load(path) if path.suffix != ".GZ" else nib.Nifti1Image.from_bytes(
            __import__("gzip").decompress(path.read_bytes()))
        assert volume.array.dtype == np.int16
        assert np.array_equal(volume.array, np.asanyarray(expected.dataobj))
        assert np.allclose(volume.affine, expected.affine)
        assert fmt.read_header(path).shape == volume.array.shape
    with pytest.raises(ScanError, match="truncated"):
        fmt.read_volume(cohort / "truncated.nii.gz")
    plain = (cohort / "plain.nii").read_bytes()
    (cohort / "cut.nii").write_bytes(plain[:-100])
    with pytest.raises(ScanError, match="truncated: .* bytes of image data"):
        fmt.read_volume(cohort / "cut.nii")
    (cohort / "text.nii").write_text("hello")
    with pytest.raises(ScanError, match="not a NIfTI file"):
        fmt.read_volume(cohort / "text.nii")


def test_native_array_keeps_int16_and_exact_integers() -> None:
    assert native_array(np.zeros((2, 2, 2), np.int16)).dtype == np.int16
    assert native_array(np.full((2, 2, 2), -1024, np.int32)).dtype == np.int16
    assert native_array(np.full((2, 2, 2), 40000, np.int32)).dtype == np.float32
    assert native_array(np.zeros((2, 2, 2), np.float64)).dtype == np.float32
    fortran = np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    assert native_array(fortran) is fortran


def test_label_map_written_with_isal_is_the_nibabel_image(tmp_path: Path, cohort: Path) -> None:
    volume = NiftiFormat().read_volume(cohort / "UPPER.NII.GZ")
    labels = (np.arange(volume.array.size) % 105).astype(np.uint8).reshape(volume.array.shape)
    path = tmp_path / "out" / "seg.nii.gz"
    NiftiLabelMapWriter().write(labels, volume, path)
    saved = nib.load(path)
    assert saved.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(saved.dataobj), labels)
    assert np.allclose(saved.affine, volume.affine)
    assert [p.name for p in path.parent.iterdir()] == ["seg.nii.gz"]  # no temporary file left


class FakeServer:
    """In-process stand-in for a server connection: labels = the CT's voxels mod 7. Only for the
    scheduling tests here; the real thing is tested in tests/test_client.py."""

    def __init__(self, url: str, failing: set[str], calls: list[str], limits: ServerLimits) -> None:
        self.url, self.failing, self.calls, self._limits = url, failing, calls, limits

    def check_ready(self) -> None:
        if self.url in self.failing:
            raise SegmentationError(f"no Triton server answers at {self.url}", retryable=True)

    def limits(self) -> ServerLimits:
        return self._limits

    def segment_volume(self, volume: Volume, resolution: str | None = None, network: str | None = None) -> np.ndarray:
        self.calls.append(self.url)
        if self.url in self.failing:
            raise SegmentationError(f"server {self.url} failed: Socket closed", retryable=True)
        return (np.asarray(volume.array) % 7).astype(np.uint8)

    def close(self) -> None:
        pass


def fake_factory(failing: set[str], calls: list[str], limits: ServerLimits | None = None):  # noqa: ANN201
    limits = limits or ServerLimits(None, None, None)
    return lambda url: FakeServer(url, failing, calls, limits)


def good_scans(cohort: Path) -> list[Path]:
    for bad in ("truncated.nii.gz", "x.nrrd"):
        (cohort / bad).unlink()
    return [cohort]


def test_a_server_that_fails_mid_run_loses_no_scan(cohort: Path, tmp_path: Path) -> None:
    scans = discover(good_scans(cohort)).scans
    out = tmp_path / "out"
    plan = plan_outputs(scans, out, WRITERS, "_seg")
    failing: set[str] = set()
    calls: list[str] = []
    factory = fake_factory(failing, calls)
    seen = []

    def on_record(record) -> None:  # noqa: ANN001
        seen.append(record)
        failing.add("b:1")  # server b dies after the first scan is settled

    summary = run_cohort(plan, ["a:1", "b:1"], CohortOptions(output_dir=out, jobs=2), WRITERS, factory, on_record)
    assert summary.count("done") == len(scans) == 4 and summary.count("failed") == 0
    for scan, (path,) in plan.items():
        expected = NiftiFormat().read_volume(scan.source).array % 7
        assert np.array_equal(np.asarray(nib.load(path).dataobj), expected)
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == sorted(
        [MANIFEST_NAME] + [p[0].name for p in plan.values()])
    records = read_manifest(out / MANIFEST_NAME)
    assert sorted(r["status"] for r in records) == ["done"] * 4
    assert all(r["server"] == "a:1" for r in records[1:] if r["attempts"] > 1)


def test_rerun_skips_everything_and_all_servers_down_fails_every_scan(cohort: Path, tmp_path: Path) -> None:
    scans = discover(good_scans(cohort)).scans
    out = tmp_path / "out"
    plan = plan_outputs(scans, out, WRITERS, "_seg")
    calls: list[str] = []
    run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), WRITERS, fake_factory(set(), calls))
    before = {p: p.stat().st_mtime_ns for paths in plan.values() for p in paths}
    rerun = run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), WRITERS, fake_factory(set(), calls))
    assert rerun.count("skipped") == 4 and len(calls) == 4
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert [r["status"] for r in read_manifest(out / MANIFEST_NAME)] == ["skipped"] * 4
    assert len(read_manifest(out / MANIFEST_NAME, latest_run_only=False)) == 8
    down = run_cohort(plan, ["a:1", "b:1"], CohortOptions(output_dir=out, overwrite=True), WRITERS,
                      fake_factory({"a:1", "b:1"}, calls))
    assert down.count("failed") == 4 and "not attempted: no Triton server answers" in str(down.records[0].error)
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_oversize_scans_are_refused_before_their_voxels_are_read(cohort: Path, tmp_path: Path) -> None:
    scans = discover(good_scans(cohort)).scans
    out = tmp_path / "out"
    plan = plan_outputs(scans, out, WRITERS, "_seg")
    calls: list[str] = []
    read = threading.Event()
    original = NiftiFormat.read_volume

    def spy(self: NiftiFormat, path: Path) -> Volume:
        read.set()
        return original(self, path)

    NiftiFormat.read_volume = spy  # type: ignore[method-assign]
    try:
        limits = ServerLimits(max_input_voxels=100, max_resampled_voxels=None, default_resolution=None)
        summary = run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), WRITERS, fake_factory(set(), calls, limits))
    finally:
        NiftiFormat.read_volume = original  # type: ignore[method-assign]
    assert summary.count("failed") == 4 and not calls and not read.is_set()
    assert "above the server's limit of 100 (max_input_voxels)" in str(summary.records[0].error)


def test_a_full_disk_stops_the_run_keeps_finished_scans_and_the_rerun_completes(cohort: Path, tmp_path: Path) -> None:
    scans = discover(good_scans(cohort)).scans
    out = tmp_path / "out"

    class DiskFullOnce(NiftiLabelMapWriter):
        def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
            if "s0001" in str(path):
                from client.outputs import atomic_write

                def half(stream) -> None:  # noqa: ANN001
                    stream.write(b"partial")
                    raise OSError(28, "No space left on device")

                atomic_write(path, half)
            super().write(label_map, volume, path)

    writers = [DiskFullOnce()]
    plan = plan_outputs(scans, out, writers, "_seg")
    summary = run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), writers, fake_factory(set(), []))
    # the run stops at the first scan it cannot write: one line, the scans finished before it kept
    assert summary.stopped is not None and "s0001/ct.nii.gz: cannot write" in summary.stopped
    assert "No space left on device" in summary.stopped and "rerun the same command" in summary.stopped
    assert summary.count("failed") == 0 and 1 <= summary.count("done") <= 3
    assert not (out / "s0001").exists() or not list((out / "s0001").iterdir())
    done = {r.input for r in summary.records if r.status == "done"}
    assert all(Path(r.outputs[0]).exists() for r in summary.records)
    assert not any(p.name.startswith(".") for p in out.rglob("*"))  # no partial file, no lock left
    rerun = run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), WRITERS, fake_factory(set(), []))
    assert rerun.stopped is None and rerun.count("skipped") == len(done) and rerun.count("done") == 4 - len(done)


class Labels2Writer(NiftiLabelMapWriter):
    """A second output per scan (`<name>_labels2.nii.gz`) that cannot be made for s0002: refused up front
    (`refusal`) with `refuse`, else failing with ValueError while writing."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse

    def output_name(self, scan, suffix: str) -> str:  # noqa: ANN001
        return f"{scan.relative.name}_labels2.nii.gz"

    def refusal(self, volume: Volume) -> str | None:
        return "no UIDs to reference" if self.refuse and volume.array.shape == (12, 10, 9) else None

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        if "s0002" in str(path):
            raise ValueError("highdicom says no\non two lines")
        super().write(label_map, volume, path)


@pytest.mark.parametrize("refuse", [False, True], ids=["fails-while-writing", "refused-before-the-request"])
def test_an_output_that_cannot_be_made_costs_its_scan_no_other_output(cohort: Path, tmp_path: Path,
                                                                       refuse: bool) -> None:
    good_scans(cohort)
    small_ct(cohort / "s0002" / "ct.nii.gz", shape=(12, 10, 9), seed=2)  # the shape `refusal` knows it by
    scans = discover([cohort]).scans
    out = tmp_path / "out"
    writers = [NiftiLabelMapWriter(), Labels2Writer(refuse)]
    plan = plan_outputs(scans, out, writers, "_seg")
    calls: list[str] = []
    summary = run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), writers, fake_factory(set(), calls))
    assert summary.count("done") == 4 and summary.count("failed") == 0 and summary.incomplete == 1
    assert "4 done (1 without all outputs)" in summary.line()
    record, = [r for r in summary.records if r.missing_outputs]
    nifti, labels2 = plan[next(s for s in scans if "s0002" in str(s.source))]
    assert record.missing_outputs == [str(labels2)] and nifti.is_file() and not labels2.exists()
    why = "no UIDs to reference" if refuse else "ValueError: highdicom says no on two lines"
    assert record.error == f"{record.input}: ct_labels2.nii.gz not written: {why}"  # one line, no traceback
    assert len(calls) == 4
    # the rerun segments that scan again (not all its outputs exist), skips the others, replaces its NIfTI
    rerun = run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), writers, fake_factory(set(), calls))
    assert rerun.count("skipped") == 3 and rerun.count("done") == 1 and len(calls) == 5
    # a scan none of whose outputs can be made fails; when every writer refused it, before its request
    only = [Labels2Writer(refuse)]
    plan = plan_outputs([s for s in scans if "s0002" in str(s.source)], tmp_path / "only", only, "_seg")
    summary = run_cohort(plan, ["a:1"], CohortOptions(output_dir=tmp_path / "only"), only, fake_factory(set(), calls))
    assert summary.count("failed") == 1 and len(calls) == (5 if refuse else 6)
    assert "not segmented, no output can be made" in str(summary.records[0].error) or not refuse


def test_padding_is_measured_and_sent_as_air_only_when_asked(tmp_path: Path) -> None:
    image = synthetic_ct((12, 10, 8), (3.0, 3.0, 3.0), seed=1)
    data = np.asanyarray(image.dataobj).astype(np.int16)
    data[:3] = -3024  # a band of padding, no PixelPaddingValue in NIfTI: below -2000 HU
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(data, image.affine), tmp_path / "in" / "ct.nii.gz")
    scans = discover([tmp_path / "in"]).scans
    sent: list[int] = []

    class Spy(FakeServer):
        def segment_volume(self, volume: Volume, resolution: str | None = None,
                           network: str | None = None) -> np.ndarray:
            sent.append(int(volume.array.min()))
            return super().segment_volume(volume, resolution, network)

    for to_air, out in ((False, tmp_path / "as-is"), (True, tmp_path / "air")):
        plan = plan_outputs(scans, out, WRITERS, "_seg")
        summary = run_cohort(plan, ["a:1"], CohortOptions(output_dir=out, padding_to_air=to_air), WRITERS,
                             lambda url: Spy(url, set(), [], ServerLimits(None, None, None)))
        assert summary.records[0].padded_percent == 25.0  # 3 of 12 planes along X, as read (before replacing)
        assert read_manifest(out / MANIFEST_NAME)[0]["padded_percent"] == 25.0
    assert sent[0] == -3024 and sent[1] >= -1024


def test_outputs_that_cannot_be_written_are_refused_before_any_request(cohort: Path, tmp_path: Path) -> None:
    scans = discover(good_scans(cohort)).scans
    with pytest.raises(OutputError, match=r"cannot be written \(and 3 more outputs\): its name is 2\d\d bytes; with "
                                          r"its temporary name it must be at most 237"):
        plan_outputs(scans, tmp_path / "out", WRITERS, "_" + "x" * 230)
    deep = tmp_path / "/".join(["d" * 250] * 17)  # a path over PATH_MAX (4096 bytes)
    with pytest.raises(OutputError, match=r"the path is \d+ bytes, over the 4096 allowed: choose a shorter -o"):
        plan_outputs(scans, deep, WRITERS, "_seg")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "s0001").write_text("a file where a folder of outputs goes")
    with pytest.raises(OutputError, match=r"s0001/ct_seg.nii.gz cannot be written: .*/out/s0001 is a file, not a "
                                          "folder"):
        plan_outputs(scans, tmp_path / "out", WRITERS, "_seg")


def test_the_closing_line_counts_quality_verdicts() -> None:
    """A held result shows in the closing line, not only in its _quality.json; no verdicts, no words."""
    def record(status: str, quality: dict[str, object] | None) -> Record:
        return Record(run="r", input=f"ct{id(quality)}.nii.gz", outputs=[], status=status, quality=quality)

    plain = CohortSummary([record("done", None)], wall_seconds=10.0)
    assert "quality" not in plain.line()
    checked = CohortSummary([record("done", {"held": True, "marked": []}),
                             record("done", {"held": False, "marked": ["laterality"]}),
                             record("skipped", {"held": False, "marked": []}),
                             record("failed", None)], wall_seconds=10.0)
    assert checked.line().endswith("; quality checks of 3: 1 held back, 1 marked")
