"""clinical.statistics against a direct numpy computation, and the structure-subset helper."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from clinical.statistics import keep_structures, structure_labels, structure_statistics, write_statistics

NAMES = ["background", "spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach"]
AFFINE = np.array([[-0.8, 0.1, 0, 10], [0, 0.75, 0, -4], [0, 0, 2.5, 3], [0, 0, 0, 1]])


def _volume() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, len(NAMES), size=(30, 25, 20)).astype(np.uint8)
    labels[labels == 4] = 0  # gallbladder absent
    ct = rng.normal(40.0, 200.0, size=labels.shape).astype(np.float32)
    return labels, ct


@pytest.mark.parametrize("slab_voxels", [1 << 22, 100])
def test_statistics_equal_a_direct_numpy_computation(slab_voxels: int) -> None:
    labels, ct = _volume()
    stats = structure_statistics(labels, ct, AFFINE, NAMES, slab_voxels=slab_voxels)
    assert [s.label for s in stats] == [1, 2, 3, 5, 6]  # present ones only, no background
    voxel_ml = abs(np.linalg.det(AFFINE[:3, :3])) / 1000
    for row in stats:
        inside = ct[labels == row.label].astype(np.float64)
        assert row.name == NAMES[row.label]
        assert row.voxels == inside.size
        assert row.volume_ml == pytest.approx(inside.size * voxel_ml, rel=1e-12)
        assert row.mean_hu == pytest.approx(inside.mean(), rel=1e-9)
        assert row.std_hu == pytest.approx(inside.std(), rel=1e-9)
        assert (row.min_hu, row.max_hu) == (inside.min(), inside.max())


def test_statistics_files_hold_the_same_numbers(tmp_path) -> None:
    labels, ct = _volume()
    stats = structure_statistics(labels, ct, AFFINE, NAMES)
    write_statistics(stats, tmp_path / "s.json", tmp_path / "s.csv")
    table = json.loads((tmp_path / "s.json").read_text())
    assert list(table) == [s.name for s in stats]
    assert table["liver"]["voxels"] == next(s.voxels for s in stats if s.name == "liver")
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [r["name"] for r in rows] == [s.name for s in stats]
    assert float(rows[0]["mean_hu"]) == pytest.approx(stats[0].mean_hu)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.csv", "s.json"]  # no temporary left


def test_statistics_refuse_mismatched_or_unnamed_input() -> None:
    labels, ct = _volume()
    with pytest.raises(ValueError, match="same shape"):
        structure_statistics(labels, ct[:-1], AFFINE, NAMES)
    with pytest.raises(ValueError, match="label 6 has no name"):
        structure_statistics(labels, ct, AFFINE, NAMES[:5])
    assert structure_statistics(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 2)), AFFINE, NAMES) == []


def test_keep_structures_zeroes_the_others_and_keeps_label_values() -> None:
    labels, _ = _volume()
    kept = keep_structures(labels, NAMES, ["Liver", " spleen "])
    assert kept.dtype == labels.dtype
    assert set(np.unique(kept)) == {0, 1, 5}
    assert np.array_equal(kept == 5, labels == 5) and np.array_equal(kept == 1, labels == 1)


def test_unknown_structure_names_list_the_closest_valid_ones() -> None:
    with pytest.raises(ValueError) as error:
        structure_labels(["kidney_rigth", "livr", "liver", "xyzzy"], NAMES)
    message = str(error.value)
    assert "'kidney_rigth' (closest: kidney_right, kidney_left)" in message
    assert "'livr' (closest: liver)" in message
    assert "'xyzzy'" in message and "'liver'" not in message
    with pytest.raises(ValueError, match="background"):
        structure_labels(["background"], NAMES)  # not a structure: listed among nothing


def test_voxel_counts_equal_bincount_in_bounded_slabs() -> None:
    from clinical.statistics import voxel_counts

    rng = np.random.default_rng(3)
    for order in ("C", "F"):
        labels = np.asarray(rng.integers(0, 105, (37, 29, 23)), dtype=np.uint8, order=order)
        assert np.array_equal(voxel_counts(labels, slab_voxels=500), np.bincount(labels.ravel(), minlength=256))
    with pytest.raises(ValueError, match="must be uint8"):
        voxel_counts(np.zeros((2, 2, 2), np.int32))


@pytest.mark.parametrize("requested", [[], [""], [" ", ""]])
def test_a_subset_naming_nothing_is_refused(requested: list[str]) -> None:
    """`--roi-subset ,` or Slicer's roi_subset "," would otherwise keep no structure: an empty map, silently."""
    with pytest.raises(ValueError, match="names no structure"):
        structure_labels(requested, NAMES)
