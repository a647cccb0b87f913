"""evaluation/: merge of TotalSegmentator subject folders, MONAI metrics, and evaluate through a real server."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from clinical import structures
from evaluation.__main__ import main
from evaluation.datasets import DatasetError, read_dataset
from evaluation.evaluate import EvaluationOptions, compare, evaluate_variant, parse_variant
from evaluation.merge import MergeError, merge_subject, v2_table
from evaluation.metrics import monai_scores, score_label_maps

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
SHAPE = (20, 18, 16)
LABEL = {name: i for i, name in enumerate(structures.label_names())}


def save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def box_mask(corner: tuple[int, int, int], size: tuple[int, int, int], shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    mask[tuple(slice(c, c + s) for c, s in zip(corner, size))] = 1
    return mask


def subject(root: Path, masks: dict[str, np.ndarray], affine: np.ndarray = AFFINE) -> Path:
    save(np.full(SHAPE, -1000, np.int16), root / "ct.nii.gz")
    for name, mask in masks.items():
        save(mask, root / "segmentations" / f"{name}.nii.gz", affine)
    return root


# --- merge ---------------------------------------------------------------------------------------------------


def test_merge_writes_the_bundle_order_reports_missing_and_resolves_overlaps_by_size(tmp_path: Path) -> None:
    liver = box_mask((2, 2, 2), (10, 10, 10))  # 1000 voxels
    aorta = box_mask((8, 8, 2), (3, 3, 12))  # 108 voxels, 3x3x10 = 90 of them inside the liver
    spleen = box_mask((14, 2, 2), (4, 4, 4))
    folder = subject(tmp_path / "s0001", {"liver": liver, "aorta": aorta, "spleen": spleen,
                                          "stomach": np.zeros(SHAPE, np.uint8)})
    out = tmp_path / "merged.nii.gz"
    report = merge_subject(folder, out, "smaller")

    image = nib.load(out)
    labels = np.asanyarray(image.dataobj)
    assert labels.dtype == np.uint8 and labels.shape == SHAPE and np.allclose(image.affine, AFFINE)
    assert report.present == sorted([LABEL["liver"], LABEL["aorta"], LABEL["spleen"]])
    assert report.empty == [LABEL["stomach"]]
    assert len(report.missing) == 104 - 4 and LABEL["kidney_left"] in report.missing
    pair = tuple(sorted((LABEL["liver"], LABEL["aorta"])))
    assert report.overlaps == {pair: int((liver & aorta).sum())} == {pair: 90}
    # smaller wins: the aorta keeps all its voxels, the liver loses the shared ones
    assert (labels == LABEL["aorta"]).sum() == aorta.sum()
    assert (labels == LABEL["liver"]).sum() == liver.sum() - 90
    assert (labels == LABEL["spleen"]).sum() == spleen.sum()
    assert any("overlapping pairs" in line for line in report.lines())

    # later: the higher label wins (TotalSegmentator's combine_masks_to_multilabel_file): aorta 7 over liver 5
    later = merge_subject(folder, tmp_path / "later.nii.gz", "later")
    winner = max(LABEL["liver"], LABEL["aorta"])
    merged = np.asanyarray(nib.load(tmp_path / "later.nii.gz").dataobj)
    assert np.all(merged[(liver & aorta).astype(bool)] == winner) and later.overlaps == report.overlaps

    with pytest.raises(MergeError, match="overlap.*liver & aorta|overlap.*aorta & liver"):
        merge_subject(folder, tmp_path / "refused.nii.gz", "refuse")
    assert not (tmp_path / "refused.nii.gz").exists()


def test_merge_refuses_a_mask_on_another_grid_naming_it(tmp_path: Path) -> None:
    folder = subject(tmp_path / "s1", {"liver": box_mask((2, 2, 2), (4, 4, 4))})
    save(box_mask((1, 1, 1), (2, 2, 2), (20, 18, 15)), folder / "segmentations" / "spleen.nii.gz")
    out = tmp_path / "merged.nii.gz"
    with pytest.raises(MergeError, match=r"spleen\.nii\.gz: grid \[20, 18, 15\].*resample"):
        merge_subject(folder, out, "smaller")
    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    save(box_mask((1, 1, 1), (2, 2, 2)), folder / "segmentations" / "spleen.nii.gz", shifted)
    with pytest.raises(MergeError, match=r"spleen\.nii\.gz: .*affine"):
        merge_subject(folder, out, "smaller")
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_merge_of_a_v2_subject_keeps_shared_names_and_leaves_out_v2_only_structures(tmp_path: Path) -> None:
    table = v2_table()
    masks = {"liver": box_mask((0, 0, 0), (4, 4, 4)), "vertebrae_L1": box_mask((6, 6, 6), (3, 3, 3)),
             "heart": box_mask((10, 10, 10), (4, 4, 4)), "skull": box_mask((15, 0, 0), (3, 3, 3))}
    folder = subject(tmp_path / "v2", masks)
    report = merge_subject(folder, tmp_path / "v2.nii.gz")
    labels = np.asanyarray(nib.load(tmp_path / "v2.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, LABEL["liver"], LABEL["vertebrae_L1"]}
    assert set(report.left_out) == {"heart", "skull"}
    assert report.left_out["heart"] == table["without_v1_label"]["heart"]
    # the moved v1 labels are named with the v2 task that makes them now
    assert any("heart_myocardium (v2 task heartchambers_highres)" in line for line in report.lines())
    # v2 renamed no v1 structure: every v1 name v2 lists is the bundle's own
    assert table["renamed"] == {}
    assert set(table["moved_out_of_total"]) <= set(structures.label_names())
    assert not set(table["without_v1_label"]) & set(structures.label_names())


def test_merge_cli_makes_a_dataset_layout_that_evaluate_reads(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name in ("s0001", "s0002"):
        subject(tmp_path / "ts" / name, {"liver": box_mask((2, 2, 2), (5, 5, 5))})
    assert main(["merge", str(tmp_path / "ts"), "-o", str(tmp_path / "ds"), "--report", str(tmp_path / "r.json")]) == 0
    assert "2 merged, 0 failed" in capsys.readouterr().out
    pairs = read_dataset(tmp_path / "ds")
    assert [p.case for p in pairs] == ["s0001", "s0002"]
    assert pairs[0].image.resolve() == (tmp_path / "ts" / "s0001" / "ct.nii.gz").resolve()
    assert json.loads((tmp_path / "r.json").read_text())[0]["present"] == ["liver"]


def test_merge_refuses_bad_masks_and_outputs_in_one_line_and_writes_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    liver = box_mask((2, 2, 2), (4, 4, 4))
    soft = liver.astype(np.float32) * 0.8
    soft[2, 2, 2] = 0.3
    folder = subject(tmp_path / "s", {"liver": soft, "spleen": liver * 255, "livr": liver,
                                      "aorta": box_mask((12, 2, 2), (2, 2, 2))[..., None]})  # [X, Y, Z, 1]: 3-D
    report = merge_subject(folder, tmp_path / "ok.nii.gz")  # a soft mask and a 0/255 mask are binarised, noted
    assert report.present == [LABEL["spleen"], LABEL["liver"], LABEL["aorta"]]
    assert set(report.not_binary) == {"liver", "spleen"}
    (folder / "segmentations" / "aorta.nii.gz").unlink()
    assert "did you mean liver" in report.left_out["livr"]
    out = tmp_path / "out.nii.gz"
    for bad, match in ((liver * np.uint8(3) + box_mask((0, 0, 0), (1, 1, 1)), r"a label map, not one structure"),
                       (np.where(liver > 0, np.nan, 0).astype(np.float32), "NaN"),
                       (liver.astype(np.int16) - 1, "negative")):
        save(bad, folder / "segmentations" / "spleen.nii.gz")
        with pytest.raises(MergeError, match=r"spleen\.nii\.gz: .*" + match):
            merge_subject(folder, out)
    for name in ("spleen", "liver"):
        (folder / "segmentations" / f"{name}.nii.gz").unlink()
    with pytest.raises(MergeError, match=r"none of its 1 masks .*did you mean liver"):  # no all-zero label map
        merge_subject(folder, out)
    (folder / "segmentations" / "livr.nii.gz").unlink()
    with pytest.raises(MergeError, match=r"segmentations: no masks"):
        merge_subject(folder, out)
    save(liver, folder / "segmentations" / "liver.nii.gz")
    with pytest.raises(MergeError, match="is the subject's CT"):
        merge_subject(folder, folder / "ct.nii.gz")
    assert not out.exists() and nib.load(folder / "ct.nii.gz").get_data_dtype() == np.int16
    # the CLI: one line and status 2 for an -o that cannot be a label file, before anything is read
    (tmp_path / "folder").mkdir()
    for output in (tmp_path / "folder", tmp_path / "labels"):
        assert main(["merge", str(folder), "-o", str(output)]) == 2
    assert main(["merge", str(folder), "-o", str(out), "--report", str(tmp_path / "folder")]) == 2
    assert [r.message.count("\n") for r in caplog.records] == [0, 0, 0]
    # a subject without ct.nii.gz in a dataset root is named, not silently dropped
    (tmp_path / "ts" / "s2" / "segmentations").mkdir(parents=True)
    subject(tmp_path / "ts" / "s1", {"liver": liver})
    assert main(["merge", str(tmp_path / "ts"), "-o", str(tmp_path / "ds")]) == 1
    assert "s2/ct.nii.gz: missing" in caplog.text
    assert sorted(p.name for p in (tmp_path / "ds").rglob("*")) == ["imagesTr", "labelsTr", "s1.nii.gz", "s1.nii.gz"]


def test_merge_interrupted_leaves_no_half_written_file_nor_a_lone_image_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subject(tmp_path / "ts" / "s1", {"liver": box_mask((2, 2, 2), (4, 4, 4))})

    def interrupted(*args: object) -> None:  # Ctrl-C while the label map is being written
        raise KeyboardInterrupt

    monkeypatch.setattr("wholebody.atomic.os.replace", interrupted)
    assert main(["merge", str(tmp_path / "ts"), "-o", str(tmp_path / "ds")]) == 130
    assert [p.name for p in (tmp_path / "ds").rglob("*") if not p.is_dir()] == []


# --- metrics -------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI 1.6 inside its own metric
def test_metrics_equal_monai_on_cubes_of_known_overlap() -> None:
    from monai.metrics import compute_dice, compute_surface_dice

    shape = (32, 30, 28)
    truth, predicted = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    truth[4:14, 4:14, 4:14] = 5  # 10^3 cube
    predicted[9:19, 4:14, 4:14] = 5  # shifted by 5 along X: 500 voxels shared -> Dice 2*500/2000 = 0.5
    truth[20:30, 20:28, 0:6] = 7  # touches the volume's border
    predicted[21:30, 20:28, 0:6] = 7  # 9/10 of it: Dice 2*432/(480+432) = 0.947...
    truth[0:3, 25:28, 20:23] = 9  # missed
    predicted[25:28, 0:3, 20:23] = 11  # spurious
    spacing = (0.8, 1.2, 2.5)
    scores = {s.label: s for s in score_label_maps(predicted, truth, spacing, [5, 7, 9, 11, 13], 3.0)}

    assert scores[5].dice == pytest.approx(0.5, abs=1e-7) and scores[5].case == "both"
    assert scores[7].dice == pytest.approx(2 * 432 / (480 + 432), abs=1e-6)
    for label in (5, 7):  # MONAI on the whole, uncropped arrays
        p = torch.from_numpy(predicted == label)[None, None]
        t = torch.from_numpy(truth == label)[None, None]
        assert scores[label].dice == pytest.approx(compute_dice(p.float(), t.float()).item(), abs=1e-7)
        nsd = compute_surface_dice(p, t, class_thresholds=[3.0], include_background=True, spacing=list(spacing))
        assert scores[label].nsd == pytest.approx(nsd.item(), abs=1e-7)
        assert (scores[label].dice, scores[label].nsd) == pytest.approx(monai_scores(p[0, 0].numpy(), t[0, 0].numpy(),
                                                                                      spacing, 3.0))
    assert 0 < scores[5].nsd < 1 and scores[7].nsd > scores[5].nsd
    assert (scores[9].case, scores[9].dice, scores[9].nsd, scores[9].truth_voxels) == ("missed", 0.0, 0.0, 27)
    assert (scores[11].case, scores[11].dice, scores[11].predicted_voxels) == ("spurious", 0.0, 27)
    assert scores[13].case == "absent" and math.isnan(scores[13].dice) and math.isnan(scores[13].nsd)
    identical = score_label_maps(truth, truth, spacing, [5, 7, 9])
    assert all(s.dice == pytest.approx(1.0) and s.nsd == pytest.approx(1.0) for s in identical)


def test_dataset_layouts_and_their_errors(tmp_path: Path) -> None:
    label = box_mask((0, 0, 0), (2, 2, 2))
    save(label, tmp_path / "ds" / "imagesTr" / "a_0000.nii.gz")
    save(label, tmp_path / "ds" / "labelsTr" / "a.nii.gz")
    save(label, tmp_path / "ds" / "imagesTr" / "b.nii.gz")
    save(label, tmp_path / "ds" / "labelsTr" / "b.nii.gz")
    assert [(p.case, p.image.name, p.label.name) for p in read_dataset(tmp_path / "ds")] == [
        ("a", "a_0000.nii.gz", "a.nii.gz"), ("b", "b.nii.gz", "b.nii.gz")]
    listing = tmp_path / "pairs.csv"
    listing.write_text("image,label\n# a comment\nds/imagesTr/b.nii.gz,ds/labelsTr/b.nii.gz\n")
    assert [p.case for p in read_dataset(listing)] == ["b"]
    listing.write_text("ds/imagesTr/b.nii.gz,ds/labelsTr/missing.nii.gz\n")
    with pytest.raises(DatasetError, match="line 1: .*missing.nii.gz does not exist"):
        read_dataset(listing)
    listing.write_bytes("caf\u00e9.nii.gz,b.nii.gz\n".encode("latin-1"))  # a spreadsheet's Latin-1 export
    with pytest.raises(DatasetError, match=r"pairs\.csv: not UTF-8 text"):
        read_dataset(listing)
    (tmp_path / "ds" / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"b\.nii\.gz: no ground truth"):
        read_dataset(tmp_path / "ds")


def test_evaluate_cli_writes_csv_json_plot_and_a_paired_comparison(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """Predictions made elsewhere (folder= variants: the client's names, and the MONAI bundle's float32
    `<image>/<image>_trans.nii.gz`): no server; the outputs and the comparison; scored in 2 processes."""
    rng = np.random.default_rng(0)
    for case in ("c1", "c2", "c3"):
        truth = np.zeros(SHAPE, np.uint8)
        truth[2:10, 2:10, 2:10] = LABEL["liver"]
        truth[12:18, 2:8, 2:8] = LABEL["spleen"]
        save(np.full(SHAPE, -1000, np.int16), tmp_path / "ds" / "imagesTr" / f"{case}.nii.gz")
        save(truth, tmp_path / "ds" / "labelsTr" / f"{case}.nii.gz")
        save(truth, tmp_path / "same" / f"{case}_seg.nii.gz")
        worse = truth.copy()
        worse[2 + rng.integers(0, 3), :, :] = 0  # drop one slice of the liver and spleen
        # as the MONAI bundle's own inference writes it: a folder per image, float32 labels
        save(worse.astype(np.float32), tmp_path / "worse" / case / f"{case}_trans.nii.gz")
    out = tmp_path / "eval"
    code = main(["evaluate", str(tmp_path / "ds"), "-o", str(out), "-q", "--score-workers", "2",
                 "--compare", f"folder={tmp_path / 'same'},name=same", f"folder={tmp_path / 'worse'},name=worse"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "worse - same: mean scan Dice difference -" in printed and "lowest mean Dice" in printed
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 * 3 * 104
    liver_same = [r for r in rows if r["variant"] == "same" and r["structure"] == "liver"]
    assert [float(r["dice"]) for r in liver_same] == [1.0, 1.0, 1.0]
    absent = [r for r in rows if r["structure"] == "brain"]
    assert all(r["case_kind"] == "absent" and r["dice"] == "" for r in absent)
    document = json.loads((out / "evaluation.json").read_text())
    assert [v["variant"] for v in document["variants"]] == ["same", "worse"]
    assert document["variants"][0]["mean_dice"] == 1.0 and document["variants"][0]["absent"] == 3 * 102
    assert document["variants"][1]["scans"] == 3 and [s["case"] for s in document["variants"][1]["per_scan"]] == [
        "c1", "c2", "c3"]
    assert document["variants"][1]["per_scan"][0]["prediction"].endswith("c1_trans.nii.gz")
    comparison = document["comparison"]
    assert comparison["scans"] == 3 and comparison["mean_difference"] < 0
    assert {r["structure"] for r in comparison["structures"]} == {"liver", "spleen"}
    assert (out / "comparison.csv").read_text().startswith("label,structure,pairs")
    png = (out / "dice.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


@pytest.mark.filterwarnings("error::UserWarning")  # the plot of nothing scored: no empty-axis or legend warning
def test_evaluate_keeps_an_output_folder_consistent_and_earlier_results_when_nothing_can_be_scored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every structure absent on both sides (NaN everywhere), a rerun into a folder of an earlier --compare
    run, then runs that can score nothing (no predictions, no server): earlier results stay as they were."""
    save(np.full(SHAPE, -1000, np.int16), tmp_path / "ds" / "imagesTr" / "c1.nii.gz")
    save(np.zeros(SHAPE, np.uint8), tmp_path / "ds" / "labelsTr" / "c1.nii.gz")
    save(np.zeros(SHAPE, np.uint8), tmp_path / "empty_seg" / "c1_seg.nii.gz")
    (tmp_path / "none").mkdir()
    out, ds, empty = tmp_path / "eval", str(tmp_path / "ds"), str(tmp_path / "empty_seg")
    assert main(["evaluate", ds, "-o", str(out), "-q", "--compare", f"folder={empty},name=a",
                 f"folder={empty},name=b"]) == 0
    assert (out / "comparison.csv").exists()
    save(np.zeros((*SHAPE, 1), np.uint8), tmp_path / "empty_seg" / "c1_seg.nii.gz")  # [X, Y, Z, 1] is 3-D
    assert main(["evaluate", ds, "-o", str(out), "-q", "--predictions", empty]) == 0
    assert not (out / "comparison.csv").exists()  # the earlier run's table would contradict evaluation.json
    document = json.loads((out / "evaluation.json").read_text())  # strict JSON: NaN written as null
    assert document["variants"][0]["absent"] == 104 and document["variants"][0]["per_scan"][0]["mean_dice"] is None
    assert {r["dice"] for r in csv.DictReader((out / "metrics.csv").open())} == {""}
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["evaluate", ds, "-o", str(out), "-q", "--predictions", str(tmp_path / "none")]) == 1
    assert main(["evaluate", ds, "-o", str(out), "-q", "-u", "127.0.0.1:1"]) == 2  # nothing can answer
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and not (out / "predictions").exists()
    assert main(["evaluate", ds, "-o", str(out / "metrics.csv"), "-q", "--predictions", empty]) == 2
    assert "no scan was scored" in caplog.text and "127.0.0.1:1: no server answers" not in caplog.text
    assert "variant default: no server answers" in caplog.text and "is a file" in caplog.text


def test_an_interrupted_scorer_ends_its_worker_processes_at_once(tmp_path: Path) -> None:
    """Ctrl-C with --score-workers 2 left the interpreter waiting for its workers at exit, for ever."""
    from evaluation.datasets import Pair
    from evaluation.evaluate import _Scorer

    truth = save(box_mask((2, 2, 2), (8, 8, 8)) * np.uint8(LABEL["liver"]), tmp_path / "t.nii.gz")
    reported: list[object] = []
    scorer = _Scorer([Pair("c1", truth, truth)], EvaluationOptions(score_workers=2), reported.append)
    scorer.submit("c1", truth, None)
    processes = list(scorer.pool._processes.values())  # type: ignore[attr-defined]
    assert processes
    scorer.stop()
    deadline = time.monotonic() + 10  # the pool's own thread may be the one reaping them, a moment later
    while any(p.is_alive() for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.is_alive() for p in processes) and reported == [], [(p, p.exitcode) for p in processes]


# --- through a real server -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_real_ct(tmp_path_factory: pytest.TempPathFactory, example_ct: Path) -> Path:
    """A 48x40x36 crop of the real abdomen CT (3 mm): one 96^3 window at lowres."""
    image = nib.load(example_ct)
    crop = image.slicer[37:85, 30:70, 38:74]
    path = tmp_path_factory.mktemp("small_ct") / "abdomen.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(crop.dataobj), crop.affine, crop.header), path)
    return path


def test_ground_truth_equal_to_the_served_result_scores_dice_one(
        server, small_real_ct: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    from client import SegmentationClient

    with SegmentationClient(server.grpc_url) as seg:
        image = nib.load(small_real_ct)
        served = seg.segment(np.asarray(image.dataobj), image.affine, resolution="lowres")
    assert len(np.unique(served)) > 2  # random weights still give several structures
    ds = tmp_path / "ds"
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "imagesTr" / "abdomen_0000.nii.gz").symlink_to(small_real_ct)
    save(served.astype(np.uint8), ds / "labelsTr" / "abdomen.nii.gz", image.affine)

    out = tmp_path / "eval"
    args = ["evaluate", str(ds), "-o", str(out), "-u", server.grpc_url, "--resolution", "lowres", "-q"]
    assert main(args) == 0
    document = json.loads((out / "evaluation.json").read_text())
    (variant,) = document["variants"]
    assert variant["segmented"] == 1 and variant["failed"] == 0
    scored = [s for s in variant["structures"] if s["scored"]]
    assert len(scored) == len(np.unique(served)) - 1
    assert all(s["dice_mean"] == pytest.approx(1.0) and s["nsd_mean"] == pytest.approx(1.0) for s in scored)
    assert variant["mean_dice"] == pytest.approx(1.0) and variant["missed"] == variant["spurious"] == 0
    assert (out / "predictions" / "default" / "abdomen_0000_seg.nii.gz").is_file()
    for name in ("metrics.csv", "structures.csv", "dice.png"):
        assert (out / name).stat().st_size > 0
    capsys.readouterr()

    # a rerun re-scores the kept prediction without a request; the evaluation object agrees
    assert main(args) == 0
    assert json.loads((out / "evaluation.json").read_text())["variants"][0]["segmented"] == 0
    pairs = read_dataset(ds)
    result = evaluate_variant(pairs, parse_variant("name=default", [server.grpc_url], "lowres"), out,
                              EvaluationOptions())
    assert result.segmented == 0 and result.scans[0].error is None
    assert compare(result, result)["mean_difference"] == 0.0

    # one image, two readers' labels (a list file): segmented once, scored against each
    other = served.astype(np.uint8)
    other[other == other.max()] = 0
    save(other, tmp_path / "reader_b.nii.gz", image.affine)
    (tmp_path / "pairs.csv").write_text(f"{small_real_ct},{ds / 'labelsTr' / 'abdomen.nii.gz'}\n"
                                        f"{small_real_ct},reader_b.nii.gz\n")
    out2 = tmp_path / "eval2"
    assert main(["evaluate", str(tmp_path / "pairs.csv"), "-o", str(out2), "-u", server.grpc_url,
                 "--resolution", "lowres", "-q"]) == 0
    (variant,) = json.loads((out2 / "evaluation.json").read_text())["variants"]
    assert (variant["segmented"], variant["scored"], variant["failed"]) == (1, 2, 0)
    assert [s["mean_dice"] < 1.0 for s in variant["per_scan"]] == [False, True]


def test_evaluate_names_a_ground_truth_on_another_grid_or_out_of_range_and_scores_the_rest(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture) -> None:
    truth = box_mask((2, 2, 2), (5, 5, 5)) * LABEL["liver"]
    for case in ("good", "shifted", "foreign"):
        save(np.full(SHAPE, -1000, np.int16), tmp_path / "ds" / "imagesTr" / f"{case}.nii.gz")
        save(truth, tmp_path / "pred" / f"{case}_seg.nii.gz")
    save(truth, tmp_path / "ds" / "labelsTr" / "good.nii.gz")
    shifted = AFFINE.copy()
    shifted[2, 3] = 4.0
    save(truth, tmp_path / "ds" / "labelsTr" / "shifted.nii.gz", shifted)
    save((truth > 0).astype(np.int16) * 117, tmp_path / "ds" / "labelsTr" / "foreign.nii.gz")  # v2 numbering
    out = tmp_path / "eval"
    assert main(["evaluate", str(tmp_path / "ds"), "-o", str(out), "-q", "--predictions", str(tmp_path / "pred")]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("shifted.nii.gz: grid" in e and "its image's grid" in e for e in errors)
    assert any("foreign.nii.gz: labels 0..117 outside the bundle's 0..104" in e for e in errors)
    document = json.loads((out / "evaluation.json").read_text())
    (variant,) = document["variants"]
    assert (variant["scored"], variant["failed"], variant["mean_dice"]) == (1, 2, 1.0)
    assert "predictions" in capsys.readouterr().out


def test_merge_of_a_real_totalsegmentator_v2_output(tmp_path: Path) -> None:
    """TotalSegmentator 2.18's own `--fast` result for a real CT (117 masks, v2 names, from its sdist)."""
    from wholebody.sample_data import real_ct, real_label_map, real_label_masks

    folder = tmp_path / "s_real"
    folder.mkdir()
    (folder / "ct.nii.gz").symlink_to(real_ct("example_ct_sm"))
    (folder / "segmentations").symlink_to(real_label_masks())
    report = merge_subject(folder, tmp_path / "real.nii.gz", "smaller")
    table = v2_table()
    assert set(report.left_out) == set(table["without_v1_label"]) - {"vertebrae_L6"}  # all 20 v2-only structures
    assert {structures.label_names()[i] for i in report.missing} == set(table["moved_out_of_total"])
    assert len(report.present) + len(report.empty) == 104 - 7
    assert report.present and not report.overlaps  # one multilabel split into masks: no overlaps
    merged = np.asanyarray(nib.load(tmp_path / "real.nii.gz").dataobj)
    expected = np.asarray(real_label_map(structures.label_names()).dataobj)
    assert np.array_equal(merged, expected)


def test_variant_specs_and_structure_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from evaluation.evaluate import EvaluationError

    amp = parse_variant("torch_amp", ["a:8001"], "lowres")
    assert (amp.name, amp.urls, amp.network, amp.resolution, amp.folder) == ("torch_amp", ("a:8001",), "torch_amp",
                                                                             "lowres", None)
    two = parse_variant("url=b:8001,url=c:8001,network=trt_fp16,name=trt", ["a:8001"])
    assert (two.name, two.urls, two.network) == ("trt", ("b:8001", "c:8001"), "trt_fp16")
    folder = parse_variant(f"folder={tmp_path}", ["a:8001"], "lowres", "torch_fp32")
    assert folder.folder == tmp_path and folder.urls == () and folder.network is None
    for bad, message in (("network=fp64", "unknown network 'fp64'"), ("gpu=1", "unknown key 'gpu'"),
                         ("resolution=medium", "unknown resolution"), (f"folder={tmp_path / 'none'}", "not a folder"),
                         ("name=../up", "name '../up' must be"), ("name=..", "name '..' must be")):
        with pytest.raises(EvaluationError, match=message):
            parse_variant(bad, ["a:8001"])
    assert main(["evaluate", str(tmp_path), "-o", str(tmp_path / "o"), "--structures", "livr"]) == 2
    assert "unknown structure 'livr'; did you mean liver" in caplog.text
