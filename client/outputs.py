"""Writing results: where each scan's outputs go, and the writers that make them.

An output type is an `OutputWriter`: it names its file for a scan and writes it from the label map
and the scan's `Volume`: the NIfTI label map, a DICOM-SEG (DICOM inputs), a Slicer .seg.nrrd, the
per-structure statistics (JSON and CSV: two writers sharing one computation) and a preview PNG.
With quality checks, `<name>_quality.json` (`clinical.quality`; its summary goes into the manifest
record) and with `sr`, a DICOM SR (`clinical.structured_report`) next to the DICOM-SEG it references; with
`rtstruct`, an RT Structure Set (`clinical.rtstruct`) for radiotherapy planning systems.
The formats themselves live in `clinical/`; the writers here only name files and pass arrays.
Structure names, colours and codes come from `clinical.structures` (the server's `label_names` are
checked against them once per run by the CLI). Every file is written under a hidden temporary name
in its final folder and renamed when complete, so an interrupted run never leaves a partial result.

    writers = make_writers(["nifti", "seg-nrrd"], statistics=True, preview=False)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import nibabel as nib
import numpy as np
from isal import igzip

from client.inputs import Scan, Volume
from clinical import structures
from clinical.seg_encodings import DEFAULT_ENCODING, ENCODINGS
from wholebody import atomic

# The format modules are imported by their writers' `write`, so that NIfTI alone needs none of
# highdicom/pydicom (DICOM-SEG), pynrrd (seg.nrrd) or matplotlib (preview).
if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from clinical.quality import QualityPolicy, QualityReport
    from clinical.statistics import StructureStatistics

OUTPUT_TYPES = ("nifti", "dicom-seg", "seg-nrrd")  # label-map outputs; --output-type
# atomic_write's hidden temporary name adds this many bytes to an output's name: ".<name>.XXXXXXXX.partial"
TEMPORARY_NAME_EXTRA = atomic.TEMPORARY_NAME_EXTRA

# ISA-L's level 1: for a 512x512x397 label map ~10x faster than zlib's level 1 (what nibabel uses)
# at a similar size; label maps are long runs of few values.
GZIP_LEVEL = 1


class OutputError(ValueError):
    """The output location cannot be used; the message names it and the fix."""


class OutputWriter(Protocol):
    """One kind of output file per scan."""

    def output_name(self, scan: Scan, suffix: str) -> str:
        """The file name for `scan` (its folder comes from `scan.relative`)."""

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        """Write the [X, Y, Z] uint8 label map of `volume` to `path` (atomically: see `atomic_write`).

        A writer that may not be able to use some volume also has `refusal(volume) -> str | None`: why
        it cannot (one line), asked by the cohort once the volume is read, before its request."""


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(stream)` on a hidden temporary file next to `path`, then rename it to `path`.

    The folder is created if missing; the rest is `wholebody.atomic.atomic_write`: the file gets the
    usual permissions (0666 less the umask); on any failure the temporary file is removed and nothing is
    left at `path` that was not there before.

    Raises:
        OSError: the folder or file cannot be made, written or renamed; `write`'s exceptions pass through.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write(path, write)


def label_map_image(label_map: np.ndarray, like: nib.Nifti1Image | nib.Nifti2Image) -> nib.Nifti1Image:
    """uint8 labels as a NIfTI image with `like`'s affine and header (no scaling, cal_max = top label)."""
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(label_map.shape)
    header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    header["cal_min"], header["cal_max"] = 0, int(label_map.max(initial=0))
    # NIfTI stores voxels in Fortran order: given a Fortran-ordered array nibabel writes it as it is
    # (0.2 s for 512x512x397) instead of transposing it chunk by chunk (1.8 s)
    data = np.asfortranarray(label_map.astype(np.uint8, copy=False))
    return type(like)(data, like.affine, header)


def write_nifti(image: nib.Nifti1Image | nib.Nifti2Image, path: Path, compress: bool | None = None) -> None:
    """Save `image` to `path` atomically; gzip (ISA-L) when `compress` or the name ends in .gz."""
    compress = path.name.lower().endswith(".gz") if compress is None else compress

    def write(stream: BinaryIO) -> None:
        if compress:
            with igzip.IGzipFile(fileobj=stream, mode="wb", compresslevel=GZIP_LEVEL) as gz:
                image.to_file_map({"image": nib.FileHolder(fileobj=gz)})
        else:
            image.to_file_map({"image": nib.FileHolder(fileobj=stream)})

    atomic_write(path, write)


@dataclass(frozen=True)
class NiftiLabelMapWriter:
    """The label map as NIfTI with the input's grid, affine and header, uint8 voxels.

    Compressed (`.nii.gz`) unless the input was an uncompressed `.nii` (kept: writing it is faster).
    """

    def output_name(self, scan: Scan, suffix: str) -> str:
        plain = scan.source.is_file() and scan.source.name.lower().endswith(".nii")
        return f"{scan.relative.name}{suffix}{'.nii' if plain else '.nii.gz'}"

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        write_nifti(label_map_image(label_map, volume.like), path)


@dataclass(frozen=True)
class DicomSegWriter:
    """The label map as a DICOM-SEG referencing the scan's DICOM series (`clinical.dicom_seg`) in
    `encoding`, one of `clinical.seg_encodings.ENCODINGS` (default LABELMAP, RLE Lossless; "binary" for
    readers older than the 2024 Label Map SOP class). Only for DICOM scans (`Volume.source_datasets`)."""

    encoding: str = DEFAULT_ENCODING

    def output_name(self, scan: Scan, suffix: str) -> str:
        return f"{scan.relative.name}{suffix}.dcm"

    REFERENCED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")

    def refusal(self, volume: Volume) -> str | None:
        """Why no DICOM-SEG can reference `volume`'s series (one line), None when one can: a series whose
        files lack the UIDs a SEG must reference (anonymised away), or a multi-frame (enhanced) CT."""
        datasets = volume.source_datasets
        if not datasets:
            return "a DICOM-SEG needs a DICOM input series to reference; write nifti or seg-nrrd for it"
        if any(_frames(ds) > 1 for ds in datasets):
            return ("a DICOM-SEG of a multi-frame (enhanced) CT is not written by this version; write nifti or "
                    "seg-nrrd for it")
        for key in self.REFERENCED:
            if not all(ds.get(key) for ds in datasets):
                return (f"its DICOM files lack {key} (anonymised away?), which a DICOM-SEG must reference; write "
                        "nifti or seg-nrrd for it")
        return None

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        if volume.source_datasets is None:
            raise ValueError("a DICOM-SEG needs a DICOM input series to reference")
        from clinical.dicom_seg import write_dicom_seg

        write_dicom_seg(label_map, volume.source_datasets, path, encoding=self.encoding)


def _frames(ds: Dataset) -> int:
    """NumberOfFrames of a DICOM header, 1 when absent or not a number."""
    try:
        return int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True)
class SegNrrdWriter:
    """The label map as a 3D Slicer segmentation (`.seg.nrrd`, named and coloured segments, each with
    its SNOMED CT codes as Slicer's TerminologyEntry)."""

    def output_name(self, scan: Scan, suffix: str) -> str:
        return f"{scan.relative.name}{suffix}.seg.nrrd"

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        from clinical.seg_nrrd import terminology_entry, write_seg_nrrd

        entries = [None if s.category is None or s.type is None else terminology_entry(s.category, s.type, s.modifier)
                   for s in structures.structures()]
        write_seg_nrrd(path, label_map, volume.affine, structures.label_names(), structure_colors(),
                       terminologies=entries)


def structure_colors() -> list[tuple[int, int, int]]:
    """Display colour (r, g, b 0..255) per label value, from `clinical/structures.json`."""
    return [s.color for s in structures.structures()]


class StatisticsTable:
    """The statistics of the latest label map, computed once for its JSON and CSV writers (which the
    cohort's one writer thread calls one after the other with the same arrays)."""

    def __init__(self) -> None:
        self._key: tuple[int, int] | None = None
        self._rows: list[StructureStatistics] = []

    def rows(self, label_map: np.ndarray, volume: Volume) -> list[StructureStatistics]:
        key = (id(label_map), id(volume))
        if key != self._key:
            from clinical.statistics import structure_statistics

            self._rows = structure_statistics(label_map, volume.array, volume.affine, structures.label_names())
            self._key = key
        return self._rows


@dataclass(frozen=True)
class StatisticsWriter:
    """Per-structure voxel count, volume (mL) and HU statistics (`clinical.statistics`) as `json` or `csv`."""

    table: StatisticsTable
    kind: str  # "json" | "csv"

    def output_name(self, scan: Scan, suffix: str) -> str:
        return f"{scan.relative.name}_statistics.{self.kind}"

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        from clinical.statistics import write_statistics

        rows = self.table.rows(label_map, volume)
        write_statistics(rows, json_path=path if self.kind == "json" else None,
                         csv_path=path if self.kind == "csv" else None)


class QualityTable:
    """The quality report of the latest label map (`clinical.quality.check_scan` under `policy`), computed
    once for the quality JSON, the SR and the manifest, from the statistics of `statistics` (one computation)."""

    def __init__(self, policy: QualityPolicy | None, statistics: StatisticsTable) -> None:
        self.policy, self.statistics = policy, statistics
        self._key: tuple[int, int] | None = None
        self._report: QualityReport | None = None

    def report(self, label_map: np.ndarray, volume: Volume) -> QualityReport:
        key = (id(label_map), id(volume))
        if key != self._key or self._report is None:
            from clinical.quality import check_scan

            padded = (None if volume.padded_voxels is None
                      else volume.padded_voxels / max(volume.array.size, 1))
            self._report = check_scan(label_map, volume.array, volume.affine, structures.label_names(),
                                      policy=self.policy, padded_fraction=padded,
                                      statistics=self.statistics.rows(label_map, volume))
            self._key = key
        return self._report


@dataclass(frozen=True)
class QualityWriter:
    """`<name>_quality.json`: every quality check of the result and the policy's verdict (`clinical.quality`);
    `manifest_summary` gives the cohort manifest its short form (`QualityReport.to_manifest`)."""

    table: QualityTable

    def output_name(self, scan: Scan, suffix: str) -> str:
        return f"{scan.relative.name}_quality.json"

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        from clinical.quality import write_quality_json

        write_quality_json(self.table.report(label_map, volume), path)

    def manifest_summary(self, label_map: np.ndarray, volume: Volume) -> dict[str, object]:
        return self.table.report(label_map, volume).to_manifest()


SR_SUFFIX = "_sr.dcm"  # the SR of `<name><suffix>.dcm` (the SEG) is `<name><suffix>_sr.dcm`, beside it


@dataclass(frozen=True)
class StructuredReportWriter:
    """A DICOM SR (TID 1500, `clinical.structured_report`) of the volume and HU statistics of each structure,
    with the quality checks as qualitative evaluations, referencing the scan's DICOM-SEG: the SEG written just
    before it by `DicomSegWriter` into the same folder (`<name><suffix>.dcm`; this file is
    `<name><suffix>_sr.dcm`). Only for DICOM scans, and only with the DICOM-SEG output."""

    table: QualityTable

    def output_name(self, scan: Scan, suffix: str) -> str:
        return f"{scan.relative.name}{suffix}{SR_SUFFIX}"

    def refusal(self, volume: Volume) -> str | None:
        return DicomSegWriter().refusal(volume)  # what refuses its SEG refuses it

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        import pydicom

        from clinical.structured_report import make_measurement_report, write_measurement_report

        seg_path = seg_path_of(path)
        if volume.source_datasets is None or not seg_path.is_file():
            raise ValueError(f"the SR references the DICOM-SEG {seg_path.name}, which was not written")
        seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
        sr = make_measurement_report(seg, volume.source_datasets, label_map, volume.array, volume.affine,
                                     self.table.report(label_map, volume),
                                     statistics=self.table.statistics.rows(label_map, volume))
        write_measurement_report(sr, path)

    def manifest_summary(self, label_map: np.ndarray, volume: Volume) -> dict[str, object]:
        """The verdict its qualitative evaluations carry, for the manifest (also without --quality-checks)."""
        return self.table.report(label_map, volume).to_manifest()


def seg_path_of(sr_path: Path) -> Path:
    """The DICOM-SEG an SR output refers to: `x_seg_sr.dcm` -> `x_seg.dcm`."""
    return sr_path.with_name(sr_path.name[: -len(SR_SUFFIX)] + ".dcm")


RTSTRUCT_SUFFIX = "_rtstruct.dcm"


@dataclass(frozen=True)
class RtStructWriter:
    """`<name>_rtstruct.dcm`: an RT Structure Set referencing the scan's CT series, one ROI per structure present,
    named and coloured from `clinical/structures.json` (`clinical.rtstruct`). Only for DICOM scans; refused
    where a DICOM-SEG is (a series without the UIDs to reference, a multi-frame CT)."""

    def output_name(self, scan: Scan, suffix: str) -> str:
        return f"{scan.relative.name}{RTSTRUCT_SUFFIX}"

    def refusal(self, volume: Volume) -> str | None:
        why = DicomSegWriter().refusal(volume)
        return None if why is None else why.replace("a DICOM-SEG", "an RTSTRUCT")

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        if volume.source_datasets is None:
            raise ValueError("an RTSTRUCT needs a DICOM input series to reference")
        from clinical.rtstruct import write_rtstruct

        write_rtstruct(label_map, volume.source_datasets, path, structures.label_names(), structure_colors())


@dataclass(frozen=True)
class PreviewWriter:
    """A PNG of three orthogonal CT slices with the labels in their colours (`clinical.preview`)."""

    def output_name(self, scan: Scan, suffix: str) -> str:
        return f"{scan.relative.name}_preview.png"

    def write(self, label_map: np.ndarray, volume: Volume, path: Path) -> None:
        from clinical.preview import write_preview

        write_preview(path, volume.array, volume.affine, label_map, structure_colors(), title=path.name)


def make_writers(output_types: Sequence[str] = ("nifti",), statistics: bool = False,
                 preview: bool = False, seg_encoding: str = DEFAULT_ENCODING, quality: bool = False,
                 quality_policy: QualityPolicy | None = None, sr: bool = False,
                 rtstruct: bool = False) -> list[OutputWriter]:
    """The writers for `output_types` (a subset of OUTPUT_TYPES, in that order) and the extras; the
    DICOM-SEG in `seg_encoding` (a name of `clinical.seg_encodings.ENCODINGS`); with `quality` the quality
    JSON under `quality_policy` (default: clinical.quality.DEFAULT_ACTIONS); with `sr` the SR after the
    DICOM-SEG (`sr` needs "dicom-seg" in `output_types`); with `rtstruct` the RT Structure Set (DICOM inputs).

    Raises ValueError naming the valid types for an unknown one or an unknown encoding, or when
    nothing would be written.
    """
    unknown = [t for t in output_types if t not in OUTPUT_TYPES]
    if unknown:
        raise ValueError(f"unknown output type {', '.join(unknown)}; choose from {', '.join(OUTPUT_TYPES)}")
    if seg_encoding not in ENCODINGS:
        raise ValueError(f"unknown DICOM-SEG encoding {seg_encoding!r}; choose from {', '.join(ENCODINGS)}")
    by_type: dict[str, OutputWriter] = {
        "nifti": NiftiLabelMapWriter(), "dicom-seg": DicomSegWriter(seg_encoding), "seg-nrrd": SegNrrdWriter()}
    writers = [by_type[t] for t in OUTPUT_TYPES if t in output_types]
    if sr and "dicom-seg" not in output_types:
        raise ValueError("an SR references the DICOM-SEG: add dicom-seg to the output types")
    table = StatisticsTable()
    checks = QualityTable(quality_policy, table)
    if sr:
        writers.insert(writers.index(by_type["dicom-seg"]) + 1, StructuredReportWriter(checks))
    if rtstruct:
        writers.append(RtStructWriter())
    if statistics:
        writers += [StatisticsWriter(table, "json"), StatisticsWriter(table, "csv")]
    if quality:
        writers.append(QualityWriter(checks))
    if preview:
        writers.append(PreviewWriter())
    if not writers:
        raise ValueError("no output requested; give --output-type, --statistics, --rtstruct or --preview")
    return writers


def output_paths(scan: Scan, output_dir: Path, writers: Sequence[OutputWriter], suffix: str) -> list[Path]:
    """Where `scan`'s outputs go: `output_dir / scan.relative.parent / <writer's name>`."""
    return [output_dir / scan.relative.parent / w.output_name(scan, suffix) for w in writers]


def path_problem(path: Path, limits: dict[Path, tuple[int, int]] | None = None) -> str | None:
    """Why `path` cannot be written, found without writing anything (None: nothing found): a name
    longer than the file system's NAME_MAX bytes (an output's own name together with its temporary
    name, TEMPORARY_NAME_EXTRA bytes more), a path of PATH_MAX bytes or more, a folder on the way that
    is a file, or a folder that cannot be written. `limits` caches (NAME_MAX, PATH_MAX) per folder."""
    absolute = Path(os.path.abspath(path))
    existing = absolute.parent
    while not os.path.lexists(existing):
        existing = existing.parent
    limits = {} if limits is None else limits
    if existing not in limits:
        def conf(name: str, default: int) -> int:
            try:
                return int(os.pathconf(existing, name))
            except (OSError, ValueError):
                return default

        limits[existing] = conf("PC_NAME_MAX", 255), conf("PC_PATH_MAX", 4096)
    name_max, path_max = limits[existing]
    for part in absolute.parts[1:-1]:
        if len(os.fsencode(part)) > name_max:
            return f"its folder name {part[:40]}... is {len(os.fsencode(part))} bytes, over the {name_max} allowed"
    name = len(os.fsencode(absolute.name))
    if name + TEMPORARY_NAME_EXTRA > name_max:
        return (f"its name is {name} bytes; with its temporary name it must be at most "
                f"{name_max - TEMPORARY_NAME_EXTRA}: shorten --suffix or the input's name")
    if len(os.fsencode(str(absolute))) + TEMPORARY_NAME_EXTRA >= path_max:
        return f"the path is {len(os.fsencode(str(absolute)))} bytes, over the {path_max} allowed: choose a shorter -o"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder: move it or choose another -o"
    if os.path.isdir(absolute):
        return "a folder of that name is there: move it or choose another -o"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written: fix its permissions or choose another -o"
    return None


def plan_outputs(
    scans: Sequence[Scan], output_dir: Path, writers: Sequence[OutputWriter], suffix: str
) -> dict[Scan, list[Path]]:
    """Every scan's output paths; raises OutputError if two scans would share an output, an output
    would replace an input (compared without letter case: file systems may ignore it), or an output
    cannot be written (`path_problem`: name or path too long, a folder on the way that is a file or
    not writable), before any request; the message names the first and how many there are."""
    if any(sep in suffix for sep in ("/", os.sep, "\0")):
        raise OutputError(f"--suffix {suffix!r} must be a plain name part (no '/'), e.g. _seg")
    plan: dict[Scan, list[Path]] = {}
    owner: dict[str, Scan] = {}
    inputs = {os.path.normcase(os.path.abspath(s.source)).lower(): s for s in scans}
    out = Path(os.path.realpath(output_dir))
    for scan in scans:
        folder = Path(os.path.realpath(scan.source))
        if folder.is_dir() and (out == folder or folder in out.parents):
            raise OutputError(f"-o {output_dir} is inside the DICOM folder {scan.source}, whose files are all read as "
                              "its series (outputs included); choose an -o outside it")
        paths = output_paths(scan, output_dir, writers, suffix)
        for path in paths:
            # through links: a folder of -o linked to another must not let two scans share one file
            key = os.path.join(os.path.realpath(path.parent), path.name).lower()
            if key in owner:
                raise OutputError(
                    f"{owner[key].source} and {scan.source} would both be written to {path}; "
                    "rename one or segment them in separate runs with different -o"
                )
            if key in inputs:
                raise OutputError(f"{path} would replace the input {inputs[key].source}; choose another -o or --suffix")
            owner[key] = scan
        plan[scan] = paths
    limits: dict[Path, tuple[int, int]] = {}
    problems = [(path, why) for paths in plan.values() for path in paths
                if (why := path_problem(path, limits)) is not None]
    if problems:
        path, why = problems[0]
        more = f" (and {len(problems) - 1} more outputs)" if len(problems) > 1 else ""
        raise OutputError(f"{path} cannot be written{more}: {why}")
    return plan


def check_output_dir(output_dir: Path) -> None:
    """Make sure `output_dir` is (or can be made) a writable folder; raises OutputError naming the fix."""
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputError(f"-o {output_dir} is a file, not a folder; give a folder for the label maps")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=output_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(
            f"-o {output_dir}: cannot write there ({exc.strerror or exc}); choose a folder you can write to"
        ) from None
