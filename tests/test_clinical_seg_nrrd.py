"""clinical.seg_nrrd: Slicer .seg.nrrd written and read back with pynrrd."""

from __future__ import annotations

import math

import nrrd
import numpy as np
import pytest

from clinical.seg_nrrd import Segment, read_seg_nrrd, write_seg_nrrd

NAMES = ["background", "spleen", "kidney_right", "kidney_left", "gallbladder", "liver"]
COLORS = [(0, 0, 0), (157, 108, 162), (185, 102, 83), (185, 102, 83), (0, 151, 206), (221, 130, 101)]


def _oblique_affine() -> np.ndarray:
    c, s = math.cos(0.3), math.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([-0.8, -0.8, 2.5])
    affine[:3, 3] = [120.5, 95.25, -300.0]
    return affine


def _labels() -> np.ndarray:
    labels = np.zeros((40, 30, 20), np.uint8)
    labels[5:15, 3:9, 2:4] = 1
    labels[20:30, 10:20, 5:15] = 2
    labels[0, 0, 19] = 5
    return labels


def test_round_trip_keeps_labels_names_colours_and_geometry(tmp_path) -> None:
    path = tmp_path / "ct.seg.nrrd"
    affine = _oblique_affine()
    write_seg_nrrd(path, _labels(), affine, NAMES, COLORS)
    seg = read_seg_nrrd(path)
    assert seg.label_map.dtype == np.uint8 and np.array_equal(seg.label_map, _labels())
    np.testing.assert_allclose(seg.affine, affine, rtol=0, atol=1e-12)
    assert seg.segments == [
        Segment(1, "spleen", COLORS[1]),
        Segment(2, "kidney_right", COLORS[2]),
        Segment(5, "liver", COLORS[5]),
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["ct.seg.nrrd"]  # no temporary left


def test_header_is_slicers_lps_segmentation(tmp_path) -> None:
    path = tmp_path / "ct.seg.nrrd"
    affine = _oblique_affine()
    write_seg_nrrd(path, _labels(), affine, NAMES, COLORS)
    header = nrrd.read_header(str(path))
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_allclose(header["space directions"][0], [0.8 * math.cos(0.3), 0.8 * math.sin(0.3), 0])
    np.testing.assert_allclose(header["space origin"], [-120.5, -95.25, -300.0])
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segment0_Name"] == "spleen" and header["Segment0_LabelValue"] == "1"
    assert header["Segment0_Layer"] == "0"
    assert header["Segment0_Extent"] == "5 14 3 8 2 3"  # inclusive voxel bounding box
    assert header["Segment1_Color"] == f"{185 / 255:.6g} {102 / 255:.6g} {83 / 255:.6g}"


def test_include_empty_lists_every_structure(tmp_path) -> None:
    path = tmp_path / "all.seg.nrrd"
    write_seg_nrrd(path, _labels(), np.eye(4), NAMES, COLORS, include_empty=True)
    seg = read_seg_nrrd(path)
    assert [s.name for s in seg.segments] == NAMES[1:]
    assert nrrd.read_header(str(path))["Segment2_Extent"] == "0 -1 0 -1 0 -1"  # kidney_left: absent


def test_bad_input_writes_nothing(tmp_path) -> None:
    path = tmp_path / "bad.seg.nrrd"
    with pytest.raises(ValueError, match="label 5 has no name"):
        write_seg_nrrd(path, _labels(), np.eye(4), NAMES[:5], COLORS[:5])
    with pytest.raises(ValueError, match="3-D"):
        write_seg_nrrd(path, _labels()[0], np.eye(4), NAMES, COLORS)
    with pytest.raises(ValueError, match="colours"):
        write_seg_nrrd(path, _labels(), np.eye(4), NAMES, COLORS[:3])
    assert list(tmp_path.iterdir()) == []


def test_multi_layer_files_are_refused_in_one_line(tmp_path) -> None:
    path = tmp_path / "layers.seg.nrrd"
    nrrd.write(str(path), np.zeros((2, 4, 4, 4), np.uint8), {"kinds": ["list", "domain", "domain", "domain"]})
    with pytest.raises(ValueError, match="4-D segmentation"):
        read_seg_nrrd(path)


def test_slicers_own_reader_sees_named_coloured_segments(tmp_path) -> None:
    """slicerio (3D Slicer's Python I/O package) reads the file as Slicer does."""
    import slicerio  # the [test] extra installs it

    path = tmp_path / "ct.seg.nrrd"
    affine = _oblique_affine()
    write_seg_nrrd(path, _labels(), affine, NAMES, COLORS)
    seg = slicerio.read_segmentation(str(path))
    assert np.array_equal(seg["voxels"], _labels())
    np.testing.assert_allclose(seg["ijkToLPS"], np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, atol=1e-12)
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert [(s["name"], s["labelValue"], s["layer"]) for s in seg["segments"]] == [
        ("spleen", 1, 0),
        ("kidney_right", 2, 0),
        ("liver", 5, 0),
    ]
    for segment in seg["segments"]:
        expected = COLORS[segment["labelValue"]]
        assert [round(c * 255) for c in segment["color"]] == list(expected)
    assert seg["segments"][0]["extent"] == [5, 14, 3, 8, 2, 3]


def test_slicer_reads_each_segments_snomed_terminology(tmp_path) -> None:
    """Every structure's codes (clinical/structures.json) as Slicer's TerminologyEntry tag, parsed back by
    slicerio as 3D Slicer does: context, category, type, laterality modifier, anatomic context."""
    import slicerio

    from clinical import structures
    from clinical.seg_nrrd import SLICER_ANATOMIC_CONTEXT, SLICER_SEGMENTATION_CONTEXT, terminology_entry

    table = structures.structures()
    entries = [None if s.type is None else terminology_entry(s.category, s.type, s.modifier) for s in table]
    labels = np.zeros((len(table), 2, 2), np.uint8)
    labels[:, 0, 0] = np.arange(len(table))  # every structure present once
    path = tmp_path / "all.seg.nrrd"
    write_seg_nrrd(path, labels, np.eye(4), structures.label_names(), [s.color for s in table],
                   terminologies=entries)
    seg = slicerio.read_segmentation(str(path))
    assert len(seg["segments"]) == len(table) - 1
    for segment in seg["segments"]:
        s = table[segment["labelValue"]]
        terminology = segment["terminology"]
        assert terminology["contextName"] == SLICER_SEGMENTATION_CONTEXT
        assert terminology["category"] == ["SCT", "123037004", "Anatomical Structure"]
        assert terminology["type"] == [s.type.scheme, s.type.value, s.type.meaning], s.name
        modifier = [s.modifier.scheme, s.modifier.value, s.modifier.meaning] if s.modifier else None
        assert terminology.get("typeModifier") == modifier, s.name
        assert terminology["anatomicContextName"] == SLICER_ANATOMIC_CONTEXT
        assert "anatomicRegion" not in terminology
    kidney = next(x for x in seg["segments"] if x["name"] == "kidney_left")["terminology"]
    assert kidney["type"] == ["SCT", "64033007", "Kidney"] and kidney["typeModifier"] == ["SCT", "7771000", "Left"]
    # the exact string of Slicer's format, and our own reader gives it back
    header = nrrd.read_header(str(path))
    assert header["Segment2_Tags"] == (
        "TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^123037004^Anatomical Structure~SCT^64033007^Kidney~SCT^7771000^Left"
        "~Anatomic codes - DICOM master list~^^~^^|")
    back = read_seg_nrrd(path)
    assert [s.terminology for s in back.segments] == entries[1:]


def test_terminology_refuses_separators_and_a_short_list(tmp_path) -> None:
    from clinical.seg_nrrd import terminology_entry
    from clinical.structures import Code

    with pytest.raises(ValueError, match="cannot hold"):
        terminology_entry(Code("123037004", "SCT", "Anatomical Structure"), Code("1", "SCT", "a~b"))
    with pytest.raises(ValueError, match="terminology entries"):
        write_seg_nrrd(tmp_path / "x.seg.nrrd", _labels(), np.eye(4), NAMES, COLORS, terminologies=[None])
    assert list(tmp_path.iterdir()) == []
    write_seg_nrrd(tmp_path / "plain.seg.nrrd", _labels(), np.eye(4), NAMES, COLORS)  # no terminology: no tag
    assert "Segment0_Tags" not in nrrd.read_header(str(tmp_path / "plain.seg.nrrd"))
    assert read_seg_nrrd(tmp_path / "plain.seg.nrrd").segments[0].terminology is None
