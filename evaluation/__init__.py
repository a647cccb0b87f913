"""Ground truth and evaluation for the served bundle (issue 19, items 2 and 3).

- `evaluation.merge`: TotalSegmentator subject folders (ct.nii.gz + segmentations/*.nii.gz) -> one uint8
  label map in the bundle's order, overlaps and geometry checked.
- `evaluation.evaluate`: a labelled dataset segmented through the cohort client (`client.cohort.run_cohort`),
  scored per scan and structure with MONAI's Dice and surface Dice (`evaluation.metrics`), CSV/JSON/PNG out,
  two variants compared pairwise.

CLI: `python -m evaluation merge|evaluate --help`. Needs the `evaluation` extra (MONAI and torch for the
metrics, scipy for the Wilcoxon test); `merge` needs only the client's packages.
"""
