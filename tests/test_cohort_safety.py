"""A result is only ever its own input's, no failure hangs or hides, no input is skipped in silence,
and reading is bounded: the cohort runner's safety, without a server (an in-process segmenter) and on
real file systems (tmpfs full, remounted read-only). The same through the real server and CLI is in
tests/test_client.py."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.cohort import (LOCK_NAME, MANIFEST_NAME, CohortLocked, CohortOptions, CohortSummary, OutputLock,
                           read_manifest, run_cohort)
from client.inputs import NiftiFormat, ScanError, discover, source_identity
from client.outputs import NiftiLabelMapWriter, plan_outputs
from client.segmentation_client import SegmentationError, ServerLimits
from wholebody.sample_data import synthetic_ct

WRITERS = [NiftiLabelMapWriter()]


def small_ct(path: Path, shape: tuple[int, int, int] = (12, 10, 8), seed: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(synthetic_ct(shape, (3.0, 3.0, 3.0), seed=seed), path)
    return path


def make_cohort(root: Path, seed: int) -> Path:
    """Three patients in the layout every cohort of a site shares: s0001/ct.nii.gz, ..."""
    for i in range(3):
        small_ct(root / f"s000{i + 1}" / "ct.nii.gz", seed=seed + i)
    return root


class Fake:
    """An in-process segmenter: labels = voxels mod 7 (so two patients get two results); `gate` holds
    each request until set; counts the requests."""

    def __init__(self, gate: threading.Event | None = None, default_resolution: str | None = None) -> None:
        self.gate, self.calls, self.aborted = gate, 0, threading.Event()
        self.default_resolution = default_resolution

    def factory(self, url: str) -> Fake:
        return self

    def check_ready(self) -> None:
        pass

    def limits(self) -> ServerLimits:
        return ServerLimits(None, None, self.default_resolution)

    def segment_volume(self, volume, resolution=None, network=None) -> np.ndarray:  # noqa: ANN001
        self.calls += 1
        if self.gate is not None:
            while not self.gate.wait(0.05):
                if self.aborted.is_set():
                    raise SegmentationError("cancelled")
        return (np.asarray(volume.array) % 7).astype(np.uint8)

    def abort(self) -> None:
        self.aborted.set()

    def close(self) -> None:
        pass


def run(roots: list[Path], out: Path, fake: Fake | None = None, **options: object) -> CohortSummary:
    plan = plan_outputs(discover(roots).scans, out, WRITERS, "_seg")
    fake = fake or Fake()
    return run_cohort(plan, ["a:1"], CohortOptions(output_dir=out, **options), WRITERS, fake.factory)  # type: ignore[arg-type]


def contents(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.nii.gz"))}


# --- identity, not existence -------------------------------------------------------------------
def test_another_cohort_with_the_same_layout_is_refused_never_taken_as_its_result(tmp_path: Path) -> None:
    a, b, out = make_cohort(tmp_path / "a", seed=1), make_cohort(tmp_path / "b", seed=11), tmp_path / "out"
    assert run([a], out).count("done") == 3
    before = contents(out)
    fake = Fake()
    second = run([b], out, fake)
    assert second.count("failed") == 3 and fake.calls == 0 and contents(out) == before
    for record in second.records:
        assert f"was made from another input, {a}" in str(record.error) and "--overwrite replaces it" in str(record.error)
        assert record.input.startswith(str(b))
    # --overwrite: B's own labels replace A's
    assert run([b], out, overwrite=True).count("done") == 3
    for case in ("s0001", "s0002", "s0003"):
        expected = NiftiFormat().read_volume(b / case / "ct.nii.gz").array % 7
        assert np.array_equal(np.asarray(nib.load(out / case / "ct_seg.nii.gz").dataobj), expected)
    records = read_manifest(out / MANIFEST_NAME)
    assert {r["input_sha256"] for r in records} == {source_identity(b / c / "ct.nii.gz").sha256
                                                     for c in ("s0001", "s0002", "s0003")}


def test_a_changed_input_is_segmented_again_and_a_moved_cohort_is_still_its_own(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out)
    small_ct(a / "s0002" / "ct.nii.gz", seed=99)  # re-exported in place: another patient at the same path
    fake = Fake()
    rerun = run([a], out, fake)
    assert fake.calls == 1 and sorted(r.status for r in rerun.records) == ["done", "skipped", "skipped"]
    expected = NiftiFormat().read_volume(a / "s0002" / "ct.nii.gz").array % 7
    assert np.array_equal(np.asarray(nib.load(out / "s0002" / "ct_seg.nii.gz").dataobj), expected)
    moved = a.rename(tmp_path / "moved")  # the same bytes elsewhere: the outputs are still theirs
    fake = Fake()
    assert run([moved], out, fake).count("skipped") == 3 and fake.calls == 0


def test_another_resolution_or_network_is_segmented_again(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out, Fake(default_resolution="lowres"))
    assert {r["resolution"] for r in read_manifest(out / MANIFEST_NAME)} == {"lowres"}  # the server's default
    assert run([a], out, Fake(), resolution="lowres").count("skipped") == 3  # the same, asked by name
    assert run([a], out, Fake(), resolution="highres").count("done") == 3
    assert run([a], out, Fake(), resolution="highres", network="torch_amp").count("done") == 3
    assert run([a], out, Fake(), resolution="highres", network="torch_amp").count("skipped") == 3


def test_an_output_of_unknown_origin_is_refused(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    small_ct(out / "s0001" / "ct_seg.nii.gz", seed=5)  # copied in by hand, or an older client's
    summary = run([a], out)
    refused = [r for r in summary.records if r.status == "failed"]
    assert len(refused) == 1 and "does not say it was made from this scan" in str(refused[0].error)
    assert summary.count("done") == 2


def test_a_manifest_line_cut_by_a_crash_is_left_out(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out)
    with open(out / MANIFEST_NAME, "a") as stream:
        stream.write('{"run": "2099-01-01", "input": "x", "outp')
    assert run([a], out).count("skipped") == 3


# --- one run per output folder -------------------------------------------------------------------
def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    a, b, out = make_cohort(tmp_path / "a", seed=1), make_cohort(tmp_path / "b", seed=11), tmp_path / "out"
    gate = threading.Event()
    first: list[CohortSummary] = []
    thread = threading.Thread(target=lambda: first.append(run([a], out, Fake(gate), command="cohort A")))
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not (out / LOCK_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(CohortLocked, match=f"another run is writing there \\(pid {os.getpid()} on .*: cohort A\\)"):
            run([b], out)
    finally:
        gate.set()
        thread.join(30)
    assert first[0].count("done") == 3 and not (out / LOCK_NAME).exists()
    assert run([b], out, overwrite=True).count("done") == 3  # free again once the first has finished


def test_a_killed_run_leaves_the_folder_free(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from client.cohort import OutputLock\n"
         f"OutputLock(Path({str(out)!r}), 'held').acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(CohortLocked, match=f"pid {holder.pid} .*: held"):
            OutputLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(out):  # the kernel dropped the dead run's lock: nothing stuck
        pass


# --- every failure ends the run --------------------------------------------------------------------
@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of its own (root only: CI and the team's machines run as root)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def bounded(target: object, seconds: float = 60) -> CohortSummary:
    """Run `target()` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    result: list[CohortSummary] = []
    thread = threading.Thread(target=lambda: result.append(target()), daemon=True)  # type: ignore[operator]
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"the run hung for {seconds} s"
    return result[0]


def test_a_full_disk_at_the_start_stops_the_run_with_one_line(tmp_path: Path, tmpfs: Path) -> None:
    a = make_cohort(tmp_path / "a", seed=1)
    out = tmpfs / "out"
    out.mkdir()
    with open(tmpfs / "filler", "wb") as stream:
        with pytest.raises(OSError):
            while True:
                stream.write(b"\0" * 65536)
                stream.flush()
    summary = bounded(lambda: run([a], out))
    assert summary.stopped is not None and "No space left on device" in summary.stopped
    assert "rerun the same command to resume" in summary.stopped
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.name.endswith(".nii.gz")]
    (tmpfs / "filler").unlink()
    assert bounded(lambda: run([a], out)).count("done") == 3


def test_a_folder_turned_read_only_mid_run_stops_the_run_and_keeps_what_finished(
    tmp_path: Path, tmpfs: Path
) -> None:
    a = make_cohort(tmp_path / "a", seed=1)
    out = tmpfs / "out"
    plan = plan_outputs(discover([a]).scans, out, WRITERS, "_seg")
    settled: list[str] = []

    def readonly_after_first(record: object) -> None:
        settled.append(str(record))
        if len(settled) == 1:
            subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)

    summary = bounded(lambda: run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), WRITERS, Fake().factory,
                                         readonly_after_first))
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert summary.stopped is not None and "Read-only file system" in summary.stopped
    assert summary.count("done") == 1 and len(contents(out)) == 1
    assert not [p for p in out.rglob(".*") if p.name != LOCK_NAME]  # nothing half-written
    rerun = bounded(lambda: run([a], out))
    assert rerun.count("skipped") == 1 and rerun.count("done") == 2


def test_a_thread_that_fails_stops_the_run_instead_of_hanging(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    plan = plan_outputs(discover([a]).scans, out, WRITERS, "_seg")

    def broken(record: object) -> None:
        raise RuntimeError("a bug in a callback")

    summary = bounded(lambda: run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), WRITERS, Fake().factory,
                                         broken))
    assert summary.stopped is not None and "RuntimeError: a bug in a callback" in summary.stopped


def test_ctrl_c_cancels_the_request_in_flight_and_ends_the_threads(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    fake = Fake(threading.Event())  # never set: the request runs until aborted
    plan = plan_outputs(discover([a]).scans, out, WRITERS, "_seg")
    threading.Timer(0.5, lambda: __import__("_thread").interrupt_main()).start()
    started = time.monotonic()
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), WRITERS, fake.factory)
    assert fake.aborted.is_set() and time.monotonic() - started < 10
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert not (out / LOCK_NAME).exists()


# --- no input skipped in silence ---------------------------------------------------------------------
def test_symlinked_folders_are_followed_and_loops_and_broken_links_named(tmp_path: Path) -> None:
    root = tmp_path / "cohort"
    small_ct(root / "s0001" / "ct.nii.gz")
    elsewhere = small_ct(tmp_path / "storage" / "s0002" / "ct.nii.gz", seed=2).parent
    (root / "s0002").symlink_to(elsewhere, target_is_directory=True)
    (root / "s0001" / "back").symlink_to(root, target_is_directory=True)  # a loop
    (root / "s0003.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (root / "notes.txt").write_text("hello")
    (root / ".DS_Store").write_text("")
    found = discover([root])
    assert [str(s.relative) for s in found.scans] == ["s0001/ct", "s0002/ct"]
    assert len(found.problems) == 1 and "s0003.nii.gz: a broken symbolic link" in found.problems[0]
    assert any("s0001/back: skipped, a symbolic link loop back to" in line for line in found.skipped)
    assert any("notes.txt: skipped, not a CT scan" in line for line in found.skipped)
    assert any(".DS_Store: skipped, a hidden file" in line for line in found.skipped)
    assert len(found.skipped) == 3


# --- bounded reading -------------------------------------------------------------------------------
def test_a_gzip_stream_longer_than_its_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    image = synthetic_ct((64, 56, 48), (3.0, 3.0, 3.0), seed=1)
    path = tmp_path / "bomb.nii.gz"
    trailing = 256 * 2**20
    with gzip.open(path, "wb", compresslevel=1) as stream:
        stream.write(image.to_bytes())
        zeros = bytes(2**20)
        for _ in range(trailing // len(zeros)):
            stream.write(zeros)
    assert path.stat().st_size < trailing // 100
    tracemalloc.start()
    try:
        with pytest.raises(ScanError, match="corrupt: the data go on past the .* bytes its header declares"):
            NiftiFormat().read_volume(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 64 * 56 * 48 * 2 + 2**20, f"{peak:,} bytes allocated"


@pytest.mark.parametrize("dtype,slope,inter,order", [
    (np.int16, 1.0, 0.0, "<"), (np.int16, 1.0, 0.0, ">"), (np.int16, 2.0, -1024.0, "<"),
    (np.uint8, 1.0, 0.0, "<"), (np.float64, 1.0, 0.0, "<"), (np.int32, 0.5, 0.0, ">"),
])
def test_reading_equals_nibabel_for_every_storage(tmp_path: Path, dtype: type, slope: float, inter: float,
                                                  order: str) -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 200, (9, 7, 5)).astype(np.dtype(dtype).newbyteorder(order))
    image = nib.Nifti1Image(data, np.diag([1.5, 2.0, 3.0, 1.0]))
    image.header.set_slope_inter(slope, inter)
    path = tmp_path / "ct.nii"
    nib.save(image, path)
    volume = NiftiFormat().read_volume(path)
    expected = np.asanyarray(nib.load(path).dataobj)
    assert np.array_equal(volume.array, expected) and volume.array.dtype in (np.int16, np.float32)
    assert np.array_equal(volume.like.affine, nib.load(path).affine)
    assert np.shares_memory(volume.array, np.asanyarray(volume.like.dataobj))  # one copy, not two


def test_identity_covers_a_dicom_folder_and_names_an_unreadable_file(tmp_path: Path) -> None:
    folder = tmp_path / "dicom"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.dcm").write_bytes(b"a")
    (folder / "sub" / "b.dcm").write_bytes(b"b")
    first = source_identity(folder)
    (folder / "sub" / "b.dcm").write_bytes(b"c")
    assert source_identity(folder) != first and source_identity(folder).size == 2
    shutil.rmtree(folder / "sub")
    with pytest.raises(ScanError, match="no-such.nii: cannot read it"):
        source_identity(tmp_path / "no-such.nii")


# --- found by trying to break it ------------------------------------------------------------------
def test_another_structure_subset_or_padding_choice_is_segmented_again(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out, recipe={"roi_subset": ["liver"]})
    assert run([a], out).count("done") == 3  # the full map is not the subset's
    assert run([a], out).count("skipped") == 3
    assert run([a], out, padding_to_air=True).count("done") == 3
    assert {r["recipe"]["padding_to_air"] for r in read_manifest(out / MANIFEST_NAME)} == {True}


def test_an_output_changed_or_replaced_since_it_was_written_is_refused(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out)
    shutil.copy(out / "s0002" / "ct_seg.nii.gz", out / "s0001" / "ct_seg.nii.gz")  # another patient's labels
    (out / "s0003" / "ct_seg.nii.gz").write_bytes(b"")
    rerun = run([a], out)
    refused = sorted(str(r.error) for r in rerun.records if r.status == "failed")
    assert len(refused) == 2 and all("is not the file the manifest says was written" in e for e in refused)
    assert rerun.count("skipped") == 1


def test_resume_does_not_depend_on_how_the_output_folder_is_spelled(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    a = make_cohort(tmp_path / "a", seed=1)
    monkeypatch.chdir(tmp_path)
    run([a], Path("out"))
    assert run([a], tmp_path / "out").count("skipped") == 3
    (tmp_path / "out").rename(tmp_path / "moved")
    assert run([a], Path("moved")).count("skipped") == 3


def test_a_run_stopped_while_writing_leaves_that_scan_to_segment_again(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out)
    manifest = out / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    done = next(i for i, line in enumerate(lines) if '"status": "done"' in line and "s0001" in line)
    manifest.write_text("\n".join(lines[:done] + lines[done + 1:]) + "\n")  # killed between rename and record
    fake = Fake()
    rerun = run([a], out, fake)
    assert fake.calls == 1 and rerun.count("done") == 1 and rerun.count("skipped") == 2


def test_a_line_cut_by_a_crash_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out)
    manifest = out / MANIFEST_NAME
    manifest.write_bytes(manifest.read_bytes()[:-30])
    rerun = run([a], out)
    assert len(read_manifest(manifest)) == 3 and len(rerun.records) == 3


def test_hand_edited_manifest_lines_are_left_out_in_one_warning_each(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out)
    with open(out / MANIFEST_NAME, "ab") as stream:
        stream.write(b'{"run": "z", "status": "done", "input": "x", "outputs": null}\n')
        stream.write(b'{"run": "z", "status": "done", "input": "x", "outputs": [], "missing_outputs": 5}\n')
        stream.write(b'\xff\xfe not utf-8\n')
    with caplog.at_level("WARNING"):
        assert run([a], out).count("skipped") == 3
    assert sum("is not a record" in r.getMessage() for r in caplog.records) >= 3


def test_the_output_folder_removed_mid_run_stops_the_run(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    plan = plan_outputs(discover([a]).scans, out, WRITERS, "_seg")

    def remove_after_first(record: object) -> None:
        shutil.rmtree(out, ignore_errors=True)

    summary = bounded(lambda: run_cohort(plan, ["a:1"], CohortOptions(output_dir=out), WRITERS, Fake().factory,
                                         remove_after_first))
    assert summary.stopped is not None and "the output folder was removed or replaced" in summary.stopped


def test_a_header_whose_data_start_far_past_it_is_refused_without_reading(tmp_path: Path) -> None:
    image = synthetic_ct((8, 8, 8), (3.0, 3.0, 3.0), seed=1)
    image.header.set_data_offset(1_200_000_000)
    path = tmp_path / "offset.nii"
    path.write_bytes(image.header.binaryblock + b"\0" * 4 + np.asarray(image.dataobj).tobytes(order="F"))
    with pytest.raises(ScanError, match="corrupt header: the image data start 1,200,000,000 bytes in"):
        NiftiFormat().read_volume(path)


def test_a_link_to_the_output_folder_among_the_inputs_is_not_read(tmp_path: Path) -> None:
    root, out = tmp_path / "tree", tmp_path / "tree" / "labels"
    small_ct(root / "s0001" / "ct.nii.gz")
    small_ct(out / "s0001" / "ct_seg.nii.gz")
    (root / "link").symlink_to(out, target_is_directory=True)
    found = discover([root], exclude=[out])
    assert [str(s.relative) for s in found.scans] == ["s0001/ct"]
    assert any("link: skipped, the output folder" in line for line in found.skipped)


def test_a_nifti_beside_a_dicom_series_is_a_scan_too(tmp_path: Path) -> None:
    from clinical.dicom_series import write_ct_series

    image = synthetic_ct((12, 10, 4), (3.0, 3.0, 3.0), seed=1)
    write_ct_series(np.asanyarray(image.dataobj), image.affine, tmp_path / "mix", series_uid="1.2.3")
    small_ct(tmp_path / "mix" / "sub" / "extra.nii.gz")
    found = discover([tmp_path / "mix"])
    assert sorted(str(s.relative) for s in found.scans) == ["mix/series1", "sub/extra"]


def test_outputs_never_leave_the_output_folder_nor_land_inside_a_dicom_series(tmp_path: Path) -> None:
    from client.outputs import OutputError
    from clinical.dicom_series import write_ct_series

    a = make_cohort(tmp_path / "a", seed=1)
    with pytest.raises(OutputError, match="--suffix .* must be a plain name part"):
        plan_outputs(discover([a]).scans, tmp_path / "out", WRITERS, "/../../escaped")
    image = synthetic_ct((12, 10, 4), (3.0, 3.0, 3.0), seed=1)
    write_ct_series(np.asanyarray(image.dataobj), image.affine, tmp_path / "dcm", series_uid="1.2.3")
    with pytest.raises(OutputError, match="is inside the DICOM folder"):
        plan_outputs(discover([tmp_path / "dcm"]).scans, tmp_path / "dcm" / "labels", WRITERS, "_seg")


def test_a_linked_folder_in_the_output_cannot_make_two_scans_share_a_file(tmp_path: Path) -> None:
    from client.outputs import OutputError

    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    (out / "s0001").mkdir(parents=True)
    (out / "s0002").symlink_to("s0001", target_is_directory=True)
    with pytest.raises(OutputError, match="would both be written to"):
        plan_outputs(discover([a]).scans, out, WRITERS, "_seg")


def test_an_input_changed_while_the_run_reads_it_is_not_recorded_as_the_old_bytes(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out, resolution="lowres")
    plan = plan_outputs(discover([a]).scans, out, WRITERS, "_seg")
    original = NiftiFormat.read_volume

    def swapped_meanwhile(self: NiftiFormat, path: Path, part: str | None = None):  # noqa: ANN202
        volume = original(self, path, part)
        if "s0003" in str(path):
            small_ct(path, seed=77)  # replaced between the check and the end of the read
        return volume

    NiftiFormat.read_volume = swapped_meanwhile  # type: ignore[method-assign]
    try:
        summary = run_cohort(plan, ["a:1"], CohortOptions(output_dir=out, resolution="highres"), WRITERS,
                             Fake().factory)
    finally:
        NiftiFormat.read_volume = original  # type: ignore[method-assign]
    failed = [r for r in summary.records if r.status == "failed"]
    assert len(failed) == 1 and "changed while this run read it" in str(failed[0].error)


def test_a_finished_cohort_with_its_server_down_is_skipped_not_failed(tmp_path: Path) -> None:
    a, out = make_cohort(tmp_path / "a", seed=1), tmp_path / "out"
    run([a], out, Fake(default_resolution="highres"))

    class Down(Fake):
        def check_ready(self) -> None:
            raise SegmentationError("no Triton server answers at a:1", retryable=True)

    assert run([a], out, Down()).count("skipped") == 3


def test_a_run_killed_mid_write_from_another_working_folder_is_segmented_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = make_cohort(tmp_path / "a", seed=1)
    monkeypatch.chdir(tmp_path)
    run([a], Path("out"))
    manifest = tmp_path / "out" / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    done = next(i for i, line in enumerate(lines) if '"status": "done"' in line and "s0002" in line)
    manifest.write_text("\n".join(lines[:done] + lines[done + 1:]) + "\n")
    monkeypatch.chdir(a)
    fake = Fake()
    assert run([a], tmp_path / "out", fake).count("done") == 1 and fake.calls == 1
