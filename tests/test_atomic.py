"""The one atomic writer (`wholebody.atomic`): every output of the client gets the usual permissions from
the umask (a PACS importer or a colleague in the group can read it), two writers of one target never share
a temporary nor leave one behind, and a failing write leaves nothing. No server: the client's writers are
called directly on a small DICOM series.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest

from client.inputs import Scan, Volume, discover
from client.outputs import TEMPORARY_NAME_EXTRA, make_writers, plan_outputs
from clinical.dicom_series import write_ct_series
from wholebody.atomic import TEMPORARY_SUFFIX, atomic_path, atomic_write, atomic_write_bytes

ALL_OUTPUTS = make_writers(["nifti", "dicom-seg", "seg-nrrd"], statistics=True, preview=True)


@pytest.fixture(scope="module")
def dicom_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Scan, Volume, np.ndarray]:
    """A 24x20x8 CT series with a two-structure label map on its grid."""
    folder = tmp_path_factory.mktemp("ct") / "series"
    hu = np.full((24, 20, 8), -1000, dtype=np.int16)
    hu[4:20, 4:16, :] = 40
    write_ct_series(hu, np.diag([0.8, 0.8, 2.0, 1.0]), folder, patient_id="P1")
    scan = discover([folder]).scans[0]
    volume = scan.read_volume()
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    labels[6:12, 6:12, 2:6] = 1
    labels[12:18, 6:12, 2:6] = 5
    return scan, volume, labels


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process's umask for one test, restored after it."""
    original = os.umask(0o022)
    os.umask(original)
    try:
        yield os.umask
    finally:
        os.umask(original)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def opened(stream: BinaryIO) -> Path:
    """The file an open stream writes (atomic_write's stream is made from a descriptor: no `name`)."""
    return Path(os.readlink(f"/proc/self/fd/{stream.fileno()}"))


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(TEMPORARY_SUFFIX)]


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
def test_every_client_output_gets_its_mode_from_the_umask(
    dicom_scan: tuple[Scan, Volume, np.ndarray], tmp_path: Path, umask: Callable[[int], None], mask: int, expected: int
) -> None:
    scan, volume, labels = dicom_scan
    out = tmp_path / "out"
    umask(mask)
    paths = plan_outputs([scan], out, ALL_OUTPUTS, "_seg")[scan]
    for writer, path in zip(ALL_OUTPUTS, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        writer.write(labels, volume, path)
    assert len(set(paths)) == 6 and all(p.stat().st_size > 0 for p in paths)
    assert {p.name: oct(mode(p)) for p in paths} == {p.name: oct(expected) for p in paths}
    assert not leftovers(tmp_path)


@pytest.mark.parametrize(("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_and_folders_of_atomic_path_get_their_mode_from_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int, file_mode: int, folder_mode: int
) -> None:
    umask(mask)
    with atomic_path(tmp_path / "file.json") as tmp:
        assert mode(tmp) == file_mode  # already when the writer gets it
        tmp.write_text("{}\n")
    with atomic_path(tmp_path / "folder", directory=True) as tmp:
        (tmp / "inside.dcm").write_bytes(b"x")
    atomic_write(tmp_path / "stream.bin", lambda stream: stream.write(b"x"))
    assert mode(tmp_path / "file.json") == mode(tmp_path / "stream.bin") == file_mode
    assert mode(tmp_path / "folder") == folder_mode and (tmp_path / "folder" / "inside.dcm").read_bytes() == b"x"


@pytest.mark.parametrize(("mask", "file_mode", "program_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_the_server_tools_files_get_their_mode_from_the_umask(
    tmp_path: Path, umask: Callable[[int], None], mask: int, file_mode: int, program_mode: int
) -> None:
    """The exporter's configs and plans (atomic_write_bytes) and the launcher's unpacked programs
    (make_executable: execute wherever read) follow the umask too."""
    from wholebody.triton_server.install import make_executable

    umask(mask)
    config = atomic_write_bytes(tmp_path / "config.pbtxt", 'name: "m"\n')
    with atomic_path(tmp_path / "perf_analyzer") as tmp:
        tmp.write_bytes(b"\x7fELF")
        make_executable(tmp)
    assert config.read_text() == 'name: "m"\n' and (tmp_path / "perf_analyzer").read_bytes() == b"\x7fELF"
    assert (oct(mode(config)), oct(mode(tmp_path / "perf_analyzer"))) == (oct(file_mode), oct(program_mode))
    assert not leftovers(tmp_path)


def test_the_temporary_name_is_hidden_unique_and_as_long_as_the_client_checks(tmp_path: Path) -> None:
    target = tmp_path / "ct_seg.seg.nrrd"
    seen: list[str] = []
    for _ in range(20):
        atomic_write(target, lambda stream: seen.append(opened(stream).name))
        with atomic_path(target) as tmp:
            seen.append(tmp.name)
    assert len(set(seen)) == len(seen)
    for name in seen:
        assert name.startswith(f".{target.name}.") and name.endswith(TEMPORARY_SUFFIX)
        assert len(name) - len(target.name) == TEMPORARY_NAME_EXTRA
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("variant", ["atomic_write", "atomic_path"])
def test_two_concurrent_writers_of_one_target_keep_their_own_temporaries(tmp_path: Path, variant: str) -> None:
    target = tmp_path / "ct_seg.nii.gz"
    both_open = threading.Barrier(2, timeout=30)
    temporaries: dict[int, Path] = {}
    errors: list[BaseException] = []

    def fill(writer: int, temporary: Path, stream: BinaryIO) -> None:
        temporaries[writer] = temporary
        content = bytes([writer]) * (1 << 20)
        stream.write(content[: len(content) // 2])
        stream.flush()
        both_open.wait()  # both temporaries exist and are half written
        stream.write(content[len(content) // 2:])
        stream.flush()
        both_open.wait()  # neither is renamed yet: each still holds its own bytes only
        assert temporary.read_bytes() == content

    def run(writer: int) -> None:
        try:
            if variant == "atomic_write":
                atomic_write(target, lambda stream: fill(writer, opened(stream), stream))
            else:
                with atomic_path(target) as tmp, tmp.open("r+b") as stream:
                    fill(writer, tmp, stream)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(w,)) for w in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert temporaries[1] != temporaries[2]
    data = target.read_bytes()
    assert len(data) == 1 << 20 and data in (b"\x01" * (1 << 20), b"\x02" * (1 << 20))  # one whole version
    assert not leftovers(tmp_path) and [p.name for p in tmp_path.iterdir()] == [target.name]


class Interrupted(BaseException):
    """Like KeyboardInterrupt, without stopping pytest."""


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), Interrupted()])
def test_a_failing_write_leaves_nothing_and_keeps_the_old_file(tmp_path: Path, failure: BaseException) -> None:
    new = tmp_path / "new.json"
    old = tmp_path / "old.json"
    old.write_text("old\n")

    def half(stream: BinaryIO) -> None:
        stream.write(b"partial")
        raise failure

    for target in (new, old):
        with pytest.raises(type(failure)):
            atomic_write(target, half)
        with pytest.raises(type(failure)), atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise failure
    with pytest.raises(type(failure)), atomic_path(tmp_path / "folder", directory=True) as tmp:
        (tmp / "inside").write_text("partial")
        raise failure
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.json"] and old.read_text() == "old\n"


def test_a_failing_client_writer_leaves_nothing(
    dicom_scan: tuple[Scan, Volume, np.ndarray], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nrrd

    scan, volume, labels = dicom_scan

    def disk_full(file: str, *args: object, **kwargs: object) -> None:
        Path(file).write_bytes(b"NRRD0004\n")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nrrd, "write", disk_full)
    writer = make_writers(["seg-nrrd"])[0]
    path = plan_outputs([scan], tmp_path, [writer], "_seg")[scan][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(OSError, match="No space"):
        writer.write(labels, volume, path)
    assert not path.exists() and not leftovers(tmp_path)


def test_a_missing_folder_is_an_os_error_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "missing" / "x.json", lambda stream: stream.write(b"{}"))
    with pytest.raises(FileNotFoundError), atomic_path(tmp_path / "missing" / "x.json"):
        pass
    assert list(tmp_path.iterdir()) == []
