"""clinical.quality: each check on a constructed case that must trip it and one that must not, the policy,
and check_scan on a small phantom (RAS, 2 x 2 x 3 mm voxels) with known answers; check_scan's whole-map
passes against its per-structure crops (the reference) on those cases and on scattered random label maps."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from clinical import quality as q
from clinical import structures

NAMES = structures.label_names()
LABEL = {name: i for i, name in enumerate(NAMES)}
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])  # RAS: +x = patient's right


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """A 60x60x40 body (40 HU) in air (-1000 HU), every check passing: a liver of 1200 mL (100 000 voxels
    of 12 uL) on the right, a spleen of 180 mL on the left, the kidneys on their sides, T12-L2 in the middle."""
    labels = np.zeros((100, 80, 60), np.uint8)
    ct = np.full(labels.shape, -1000, np.int16)
    ct[5:95, 5:75, :] = 40
    labels[55:95, 10:60, 5:55] = LABEL["liver"]  # x 55..94 = right of the midline (x ~ 50)
    labels[10:25, 10:35, 10:50] = LABEL["spleen"]  # 15 x 25 x 40 = 15 000 voxels = 180 mL
    labels[60:70, 62:72, 10:20] = LABEL["kidney_right"]
    labels[25:35, 62:72, 10:20] = LABEL["kidney_left"]
    for k, name in enumerate(("vertebrae_T12", "vertebrae_L1", "vertebrae_L2")):
        labels[45:55, 70:78, 40 - 10 * k: 48 - 10 * k] = LABEL[name]
    return labels, ct


def check(report: q.QualityReport, name: str | None, kind: str) -> q.CheckResult:
    if name is None:
        return next(c for c in report.scan_checks if c.check == kind)
    return next(c for s in report.structures if s.name == name for c in s.checks if c.check == kind)


def test_the_phantom_passes_everything() -> None:
    labels, ct = phantom()
    report = q.check_scan(labels, ct, AFFINE, NAMES)
    assert report.failures() == [] and not report.held and report.marked == []
    assert check(report, "liver", "volume").values["volume_ml"] == 1200.0
    assert check(report, "spleen", "volume").status == "pass"
    assert check(report, "kidney_left", "laterality").values["observed_side"] == "left"
    assert all(c.check != "laterality" for s in report.structures if s.name == "liver" for c in s.checks)
    assert report.to_manifest() == {"held": False, "marked": [], "failed": {}, "failures": {}, "incomplete": []}


def test_incomplete_structure_trips_and_its_volume_is_not_judged() -> None:
    labels, ct = phantom()
    labels[55:95, 10:60, 0:5] = LABEL["liver"]  # the liver now reaches the first axial slice
    report = q.check_scan(labels, ct, AFFINE, NAMES)
    assert check(report, "liver", "incomplete").status == "fail"
    assert check(report, "liver", "incomplete").values == {"first_slice": True, "last_slice": False}
    assert check(report, "liver", "volume").status == "not_applicable"
    assert next(s for s in report.structures if s.name == "liver").incomplete
    assert report.marked == ["incomplete"] and not report.held  # default: mark
    assert report.to_manifest()["incomplete"] == ["liver"]
    assert check(report, "spleen", "incomplete").status == "pass"


def test_incomplete_unit() -> None:
    assert q.check_incomplete("liver", False, True).status == "fail"
    assert q.check_incomplete("liver", False, False).status == "pass"
    mask = np.zeros((4, 4, 10), bool)
    mask[1:3, 1:3, 7:10] = True
    assert q.touches_ends(mask[1:3, 1:3, 7:10], (slice(1, 3), slice(1, 3), slice(7, 10)), 2, 10) == (False, True)
    assert q.touches_ends(mask[1:3, 1:3, 7:10], (slice(1, 3), slice(1, 3), slice(7, 10)), 2, 11) == (False, False)


def test_axial_axis_follows_the_affine() -> None:
    assert q.axial_axis(AFFINE) == 2
    sagittal = np.array([[0, 0, -1.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])  # voxel y -> -S
    assert q.axial_axis(sagittal) == 1


def test_fragments_trip_specks_do_not() -> None:
    organ = np.zeros((30, 30, 30), bool)
    organ[5:15, 5:15, 5:15] = True  # 1000 voxels
    organ[20:22, 20:22, 20:22] = True  # 8 voxels: 0.8 %, a speck
    assert q.check_components("liver", organ, 0.05).status == "pass"
    organ[20:25, 20:25, 20:25] = True  # 125 voxels: 11 % outside the largest
    result = q.check_components("liver", organ, 0.05)
    assert result.status == "fail" and result.values["components"] == 2
    assert q.check_components("colon", organ, 0.05).status == "not_applicable"  # several loops are normal
    diagonal = np.zeros((4, 4, 4), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = True  # touching corners: one piece (26-connectivity)
    assert q.check_components("vertebrae_L1", diagonal, 0.0).status == "pass"


def test_fragmented_organ_in_a_scan() -> None:
    labels, ct = phantom()
    labels[40:50, 10:20, 5:15] = LABEL["kidney_right"]  # a second kidney piece as large as the first
    report = q.check_scan(labels, ct, AFFINE, NAMES)
    assert check(report, "kidney_right", "components").status == "fail"
    assert report.to_manifest()["failures"]["components"] == ["kidney_right"]


def test_laterality_unit() -> None:
    # RAS: the patient's right is +x. A right kidney at x = 80 with the midline at 50 passes...
    assert q.check_laterality("kidney_right", 80.0, 50.0, 20.0).status == "pass"
    # ... and on the left of the midline fails, as does a pair swapped against each other
    assert q.check_laterality("kidney_right", 20.0, 50.0, None).status == "fail"
    swapped = q.check_laterality("rib_left_3", 60.0, None, 40.0)
    assert swapped.status == "fail" and "rib_right_3" in swapped.detail
    assert q.check_laterality("kidney_left", 20.0, None, None).status == "not_applicable"
    assert q.side_of("rib_left_10") == "left" and q.side_of("liver") is None
    assert q.counterpart("iliac_vena_left") == "iliac_vena_right"


def test_swapped_kidneys_hold_the_result() -> None:
    labels, ct = phantom()
    right, left = labels == LABEL["kidney_right"], labels == LABEL["kidney_left"]
    labels[right], labels[left] = LABEL["kidney_left"], LABEL["kidney_right"]
    report = q.check_scan(labels, ct, AFFINE, NAMES)
    assert check(report, "kidney_left", "laterality").status == "fail"
    assert check(report, "kidney_left", "laterality").values["observed_side"] == "right"
    assert report.held  # default: laterality=hold
    relaxed = q.check_scan(labels, ct, AFFINE, NAMES, policy=q.QualityPolicy.parse("laterality=report"))
    assert not relaxed.held and relaxed.marked == []


def test_laterality_without_vertebrae_uses_the_body() -> None:
    labels, ct = phantom()
    labels[(labels >= LABEL["vertebrae_L5"]) & (labels <= LABEL["vertebrae_C1"])] = 0
    labels[labels == LABEL["kidney_right"]] = 0  # one side alone: judged against the body's centroid
    report = q.check_scan(labels, ct, AFFINE, NAMES)
    result = check(report, "kidney_left", "laterality")
    assert result.status == "pass" and result.values["midline_x_ras_mm"] == pytest.approx(2 * 49.5)


def test_heart_chambers_are_judged_against_each_other_only() -> None:
    labels, ct = phantom()
    labels[40:48, 20:30, 30:38] = LABEL["heart_ventricle_right"]  # left of the spine, right of the left ventricle
    labels[30:38, 20:30, 30:38] = LABEL["heart_ventricle_left"]
    report = q.check_scan(labels, ct, AFFINE, NAMES)
    assert check(report, "heart_ventricle_right", "laterality").status == "pass"
    labels[40:48, 20:30, 30:38], labels[30:38, 20:30, 30:38] = LABEL["heart_ventricle_left"], LABEL[
        "heart_ventricle_right"]
    assert check(q.check_scan(labels, ct, AFFINE, NAMES), "heart_ventricle_right", "laterality").status == "fail"


def test_volume_against_the_cited_ranges() -> None:
    assert q.check_volume("liver", 2500.0, False).status == "fail"
    assert q.check_volume("spleen", 50.0, False).status == "fail"
    assert q.check_volume("spleen", 200.0, False).status == "pass"
    assert q.check_volume("kidney_left", 1.0, False).status == "not_applicable"  # no cited range
    assert "Radiology" in q.check_volume("liver", 1000.0, False).values["source"]


def test_missing_vertebra_and_rib() -> None:
    present = {"vertebrae_T11", "vertebrae_L1", "vertebrae_L2", "rib_left_3", "rib_left_4", "rib_right_1"}
    results = {c.values.get("series", c.detail.split(":")[0]): c for c in q.check_neighbours(present)}
    assert results["vertebrae"].status == "fail" and results["vertebrae"].values["missing"] == ["vertebrae_T12"]
    assert results["ribs left"].status == "pass"
    assert results["ribs right"].status == "not_applicable"
    labels, ct = phantom()
    labels[labels == LABEL["vertebrae_L1"]] = 0
    report = q.check_scan(labels, ct, AFFINE, NAMES)
    assert "vertebrae_L1" in check(report, None, "neighbours").detail
    assert report.marked == ["neighbours"]


def test_hu_range_and_padding() -> None:
    t = q.QualityThresholds()
    assert q.check_hu_range(-1024, 3071, t).status == "pass"
    assert q.check_hu_range(0, 4095, t).status == "fail"  # stored values, not HU: no air
    assert q.check_hu_range(-1500, 500, t).status == "fail"
    assert q.check_padding(0.2, t).status == "pass" and q.check_padding(0.6, t).status == "fail"
    labels, ct = phantom()
    raw = (ct.astype(np.int32) + 1024).astype(np.int16)  # a series read without its rescale intercept
    report = q.check_scan(labels, raw, AFFINE, NAMES)
    assert check(report, None, "hu_range").status == "fail" and report.held
    padded = ct.copy()
    padded[:, 75:, :] = -3024  # outside the reconstruction circle: padding (below -2000 HU)
    padded[:, :5, :] = -3024
    padded[:5] = -3024
    report = q.check_scan(labels, padded, AFFINE, NAMES, thresholds=q.QualityThresholds(padding_share=0.1))
    assert check(report, None, "padding").status == "fail"
    assert check(report, None, "hu_range").values["min_hu"] == -1000.0  # padding left out of the range
    assert check(q.check_scan(labels, padded, AFFINE, NAMES, padded_fraction=0.0), None, "padding").status == "pass"


def test_policy_parse_and_errors() -> None:
    policy = q.QualityPolicy.parse("incomplete=hold, volume=mark")
    assert policy.action("incomplete") == "hold" and policy.action("laterality") == "hold"
    assert policy.action("padding") == q.DEFAULT_ACTIONS["padding"]
    for bad in ("incomplete=drop", "size=hold", "incomplete"):
        with pytest.raises(ValueError, match="quality policy"):
            q.QualityPolicy.parse(bad)


def test_tables_name_real_structures() -> None:
    known = set(NAMES)
    assert q.MULTIPART_STRUCTURES <= known and set(q.NORMAL_VOLUMES_ML) <= known
    assert all(set(members) <= known for members in q.SERIES.values())
    lateral = [n for n in NAMES if q.side_of(n)]
    assert {n for n in lateral if q.counterpart(n) not in known} == {"lung_middle_lobe_right"}
    assert q.PAIR_ONLY_LATERALITY <= set(lateral)


def test_json_writer(tmp_path: Path) -> None:
    labels, ct = phantom()
    report = q.check_scan(labels, ct, AFFINE, NAMES)
    q.write_quality_json(report, tmp_path / "ct_quality.json")
    data = json.loads((tmp_path / "ct_quality.json").read_text())
    assert data["held"] is False and set(data["structures"]) >= {"liver", "spleen"}
    assert [c["check"] for c in data["structures"]["kidney_left"]["checks"]] == [
        "incomplete", "components", "laterality", "volume"]
    assert [p.name for p in tmp_path.iterdir()] == ["ct_quality.json"]


def test_bad_inputs() -> None:
    labels, ct = phantom()
    with pytest.raises(ValueError, match="uint8"):
        q.check_scan(labels.astype(np.int32), ct, AFFINE, NAMES)
    with pytest.raises(ValueError, match="same shape"):
        q.check_scan(labels, ct[:-1], AFFINE, NAMES)


def test_real_segmentation_sides_and_a_mirrored_one() -> None:
    """TotalSegmentator's own masks of a real CT (wholebody.sample_data.real_label_map, 30 axial slices, RAS):
    every left/right structure is on its side; the same voxels mirrored left-right (affine kept) fail."""
    import nibabel as nib

    from wholebody.sample_data import real_ct, real_label_map

    image = real_label_map(NAMES)
    labels = np.asanyarray(image.dataobj)
    ct = np.asanyarray(nib.load(real_ct("example_ct_sm")).dataobj)
    report = q.check_scan(labels, ct, image.affine, NAMES)
    lateral = [c for s in report.structures for c in s.checks if c.check == "laterality"]
    assert len(lateral) >= 20 and all(c.status == "pass" for c in lateral)
    assert {"kidney_left", "kidney_right", "rib_left_9"} <= {c.structure for c in lateral}
    # a 30-slice crop: organs crossing it are incomplete, the spine and ribs within it have no gap
    assert next(s for s in report.structures if s.name == "liver").incomplete
    assert all(c.status != "fail" for c in report.scan_checks if c.check == "neighbours")
    mirrored = q.check_scan(np.ascontiguousarray(labels[::-1]), np.ascontiguousarray(ct[::-1]), image.affine, NAMES)
    flipped = [c for s in mirrored.structures for c in s.checks if c.check == "laterality"]
    assert all(c.status == "fail" for c in flipped) and mirrored.held


def test_quality_writer_on_a_nifti_scan(tmp_path: Path) -> None:
    """The client's writer (client.outputs.QualityWriter) on a NIfTI scan as the cohort reads it: the padding
    the reader measured (here: none set to air, 20 % below -2000 HU) is the padded share judged."""
    import nibabel as nib

    from client.inputs import NiftiFormat, discover, measure_padding
    from client.outputs import QualityWriter, make_writers

    labels, ct = phantom()
    ct[:, :, :12] = -3024  # 12 of 60 slices padded
    nib.save(nib.Nifti1Image(ct, AFFINE), tmp_path / "ct.nii.gz")
    scan, = discover([tmp_path / "ct.nii.gz"], (NiftiFormat(),)).scans
    volume = scan.read_volume()
    measure_padding(volume)
    writer, = [w for w in make_writers(["nifti"], quality=True, quality_policy=q.QualityPolicy.parse(
        "padding=hold")) if isinstance(w, QualityWriter)]
    writer.write(labels, volume, tmp_path / "ct_quality.json")
    data = json.loads((tmp_path / "ct_quality.json").read_text())
    padding = next(c for c in data["scan"] if c["check"] == "padding")
    assert padding["values"]["padded_percent"] == 20.0 and padding["status"] == "pass"  # limit 50 %
    assert writer.manifest_summary(labels, volume) == {"held": False, "marked": [], "failed": {}, "failures": {},
                                                       "incomplete": []}
    with pytest.raises(ValueError, match="SR references the DICOM-SEG"):
        make_writers(["nifti"], sr=True)


# ---------------------------------------------------------------------------------------------- whole map
# check_scan measures the structures either on their bounding-box crops (the reference, one mask at a time)
# or by whole-map passes for all at once (crop_volumes_max=0); the reports must be equal, numbers included.

def both_paths(labels: np.ndarray, ct: np.ndarray, affine: np.ndarray = AFFINE, **kwargs: object) -> dict:
    whole = q.check_scan(labels, ct, affine, NAMES, crop_volumes_max=0, **kwargs).to_dict()
    crops = q.check_scan(labels, ct, affine, NAMES, crop_volumes_max=math.inf, **kwargs).to_dict()
    assert whole == crops
    assert q.check_scan(labels, ct, affine, NAMES, **kwargs).to_dict() == crops  # the default choice
    return whole


def scattered_labels(shape: tuple[int, int, int], seed: int, block: int = 2, speckle: float = 0.1) -> np.ndarray:
    """Like a random-weights result: every label (0..104) everywhere, as blocks of `block` voxels of a
    random label with `speckle` of the voxels set to another random label; uint8 [X, Y, Z]."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, len(NAMES), tuple(-(-n // block) for n in shape), dtype=np.uint8)
    labels = coarse.repeat(block, 0).repeat(block, 1).repeat(block, 2)[: shape[0], : shape[1], : shape[2]].copy()
    spots = rng.random(shape) < speckle
    labels[spots] = rng.integers(0, len(NAMES), int(spots.sum()), dtype=np.uint8)
    return labels


def test_whole_map_passes_equal_the_crops_on_the_constructed_cases() -> None:
    labels, ct = phantom()
    assert both_paths(labels, ct)["failed"] == {}
    cut = labels.copy()
    cut[55:95, 10:60, 0:5] = LABEL["liver"]
    cut[10:25, 10:35, 50:60] = LABEL["spleen"]  # to the last slice
    assert both_paths(cut, ct)["structures"]["spleen"]["incomplete"]
    pieces = labels.copy()
    pieces[40:50, 10:20, 5:15] = LABEL["kidney_right"]
    pieces[2:4, 2:4, 2:4] = LABEL["colon"]  # a multipart structure: components not applicable
    pieces[6:8, 2:4, 2:4] = LABEL["colon"]
    report = both_paths(pieces, ct)
    assert report["failed"]["components"] == 1
    assert report["structures"]["colon"]["checks"][1]["detail"] == "not a single organ"
    swapped = labels.copy()
    swapped[labels == LABEL["kidney_right"]], swapped[labels == LABEL["kidney_left"]] = (
        LABEL["kidney_left"], LABEL["kidney_right"])
    assert both_paths(swapped, ct)["held"]
    spine_less = labels.copy()
    spine_less[(labels >= LABEL["vertebrae_L5"]) & (labels <= LABEL["vertebrae_C1"])] = 0
    both_paths(spine_less, ct)  # midline from the body
    both_paths(np.zeros_like(labels), ct)  # nothing present
    sagittal = np.array([[0, 0, -2.0, 0], [2.0, 0, 0, 0], [0, -3.0, 0, 0], [0, 0, 0, 1]])  # axial axis 1
    assert both_paths(cut, ct, sagittal)["structures"]["liver"]["checks"][0]["values"] == {
        "first_slice": False, "last_slice": False}


def test_whole_map_passes_equal_the_crops_on_a_real_segmentation() -> None:
    """TotalSegmentator's masks of a real CT (30 slices, RAS) and the same voxels mirrored left-right."""
    import nibabel as nib

    from wholebody.sample_data import real_ct, real_label_map

    image = real_label_map(NAMES)
    labels = np.asanyarray(image.dataobj)
    ct = np.asanyarray(nib.load(real_ct("example_ct_sm")).dataobj)
    assert not both_paths(labels, ct, image.affine)["held"]
    assert both_paths(np.ascontiguousarray(labels[::-1]), np.ascontiguousarray(ct[::-1]), image.affine)["held"]


def test_whole_map_passes_equal_the_crops_on_scattered_labels() -> None:
    """Random-weights-like maps: every label scattered over the volume, thousands of components each."""
    for seed, shape in ((0, (64, 64, 64)), (1, (40, 56, 33))):
        labels = scattered_labels(shape, seed)
        assert set(np.unique(labels)) == set(range(len(NAMES)))  # every label present
        ct = np.random.default_rng(seed).integers(-1024, 2000, shape).astype(np.int16)
        report = both_paths(labels, ct)
        assert len(report["structures"]) == len(NAMES) - 1 and report["held"]
        liver = report["structures"]["liver"]["checks"][1]
        assert liver["status"] == "fail" and liver["values"]["components"] > 100
    fortran = np.asfortranarray(scattered_labels((30, 31, 32), 2, block=3))  # NIfTI's memory order
    both_paths(fortran, np.zeros(fortran.shape, np.int16))
    strided = fortran[::-1, :, ::-2]  # a view with negative and doubled strides
    both_paths(strided, np.zeros(strided.shape, np.int16))


def test_component_sizes_across_slabs() -> None:
    """Slabs of one to a few slices: the pieces joined across every boundary (diagonal touches included)
    give the components scipy.ndimage.label finds in each label's mask."""
    labels = scattered_labels((23, 17, 19), 3, block=2, speckle=0.3)
    labels[5, 5, 5:10] = 200  # touches only diagonally across slices
    labels[6, 6, 7] = 200
    labels[7, 5, 8] = 200
    wanted = [int(v) for v in np.unique(labels) if v]
    expected = {}
    for value in wanted:
        regions, _ = ndimage_label(labels == value)
        expected[value] = sorted(np.bincount(regions.ravel())[1:].tolist())
    assert len(expected[200]) == 1
    for slab_voxels in (1, 17 * 19 * 2, 17 * 19 * 5, 1 << 22):
        sizes = q.component_sizes(labels, wanted, slab_voxels)
        assert {v: sorted(s.tolist()) for v, s in sizes.items()} == expected
    assert q.component_sizes(np.zeros((3, 3, 3), np.uint8), [1])[1].size == 0


def ndimage_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    from scipy import ndimage

    return ndimage.label(mask, structure=np.ones((3, 3, 3), bool))


def test_histograms_give_the_boxes_and_centroids_of_the_crops() -> None:
    from scipy import ndimage

    labels = scattered_labels((21, 18, 25), 4, block=3, speckle=0.02)
    labels[:, :, :] = np.where(labels < 40, 0, labels)
    for order in ("C", "F"):
        arranged = np.asarray(labels, order=order)
        histograms = q.axis_histograms(arranged, slab_voxels=18 * 25 * 2)
        for axis in range(3):
            assert histograms[axis].sum() == labels.size
            for index in (0, labels.shape[axis] - 1):
                counts = np.bincount(np.take(labels, index, axis=axis).ravel(), minlength=256)
                assert np.array_equal(histograms[axis][index], counts)
        for value, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            assert q.histogram_box(histograms, value) == box
            offset = np.array([sl.start for sl in box], np.float64)
            crop = q.mean_index(labels[box] == value) + offset
            assert np.array_equal(q.histogram_centroid(histograms, value), crop)  # the same float bits
    with pytest.raises(ValueError, match="no voxels"):
        q.histogram_centroid(q.axis_histograms(labels), 3)


def test_components_result_is_check_components() -> None:
    organ = np.zeros((30, 30, 30), bool)
    organ[5:15, 5:15, 5:15] = True
    for corner in range(8):
        organ[20 + corner // 4 * 4, 20 + corner // 2 % 2 * 4, 20 + corner % 2 * 4] = True
    organ[0:3, 25:30, 0:10] = True
    sizes = np.bincount(ndimage_label(organ)[0].ravel())[1:]
    for name in ("liver", "colon"):
        for share in (0.0, 0.05, 0.5):
            assert q.components_result(name, sizes[::-1], share) == q.check_components(name, organ, share)
    assert q.components_result("liver", np.zeros(0, np.int64), 0.05) == q.check_components(
        "liver", np.zeros((2, 2, 2), bool), 0.05)
