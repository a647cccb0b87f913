"""clinical.preview: slices in radiological orientation at true aspect, and the PNG."""

from __future__ import annotations

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from clinical.preview import orthogonal_slices, write_preview

COLORS = [(0, 0, 0), (255, 0, 0), (0, 0, 255)]


def _lps_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 40x30x20 LPS-stored volume (0.5 x 0.5 x 2 mm) with label 1 in the patient's
    right-anterior-superior corner and a small label 2 in the left-posterior-inferior one (the slices
    go through the labels' centre, inside label 1)."""
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])  # voxel i goes to the patient's left, j posterior
    ct = np.zeros((40, 30, 20), np.float32)
    labels = np.zeros(ct.shape, np.uint8)
    labels[:8, :6, 15:] = 1  # low i: right; low j: anterior; high k: superior
    labels[38:, 28:, :2] = 2
    return ct, affine, labels


def test_slices_are_in_radiological_orientation_at_true_aspect() -> None:
    ct, affine, labels = _lps_volume()
    axial, coronal, sagittal = orthogonal_slices(ct, affine, labels)
    assert axial.size_mm == (20.0, 15.0) and coronal.size_mm == (20.0, 40.0) and sagittal.size_mm == (15.0, 40.0)
    assert axial.edges == "RLAP" and coronal.edges == "RLSI" and sagittal.edges == "APSI"
    for panel in (axial, coronal, sagittal):  # right-anterior, right-superior, anterior-superior: top left
        rows, cols = np.nonzero(panel.labels == 1)
        assert rows.size and rows.max() < panel.labels.shape[0] / 2, panel.name
        assert cols.max() < panel.labels.shape[1] / 2, panel.name
    assert axial.ct.shape == (30, 40) and coronal.ct.shape == (20, 40) and sagittal.ct.shape == (20, 30)


def test_the_same_ct_stored_ras_or_lps_gives_the_same_slices(example_ct) -> None:
    image = nib.load(example_ct)
    ct = np.asarray(image.dataobj, np.float32)
    labels = (ct > 250).astype(np.uint8)
    lps = image.affine.copy()
    lps[:3, :2] *= -1
    lps[:3, 3] = image.affine[:3, :3] @ [ct.shape[0] - 1, ct.shape[1] - 1, 0] + image.affine[:3, 3]
    for ras_panel, lps_panel in zip(
        orthogonal_slices(ct, image.affine, labels), orthogonal_slices(ct[::-1, ::-1], lps, labels[::-1, ::-1])
    ):
        assert np.array_equal(ras_panel.ct, lps_panel.ct) and np.array_equal(ras_panel.labels, lps_panel.labels)
        assert ras_panel.size_mm == pytest.approx(lps_panel.size_mm)


def test_write_preview_writes_a_png_with_the_label_colours(tmp_path) -> None:
    ct, affine, labels = _lps_volume()
    ct[:] = np.linspace(-1000, 1000, ct.size).reshape(ct.shape)
    path = write_preview(tmp_path / "preview.png", ct, affine, labels, COLORS, opacity=1.0, title="test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)[..., :3]
    assert pixels.shape == (550, 1500, 3)
    assert np.any(np.all(np.isclose(pixels, [1.0, 0.0, 0.0], atol=0.02), axis=-1))  # label 1 drawn in red
    assert [p.name for p in tmp_path.iterdir()] == ["preview.png"]


def test_write_preview_refuses_bad_input_and_writes_nothing(tmp_path) -> None:
    ct, affine, labels = _lps_volume()
    with pytest.raises(ValueError, match="one shape"):
        write_preview(tmp_path / "p.png", ct[:-1], affine, labels, COLORS)
    with pytest.raises(ValueError, match="has no colour"):
        write_preview(tmp_path / "p.png", ct, affine, labels, COLORS[:1])
    assert list(tmp_path.iterdir()) == []
