"""Read a DICOM-SEG with pydicom-seg, as its users do; run by tests/test_clinical_seg_readers.py in
pydicom-seg's own virtualenv (pydicom 2, numpy 1: see requirements-pydicom-seg.txt), so it imports
nothing of this project.

    python pydicom_seg_read.py SEG.dcm OUT.npz

OUT.npz: `labels` [Z, Y, X] segment numbers (pydicom_seg.MultiClassReader: one volume, 0 = none),
`origin` (3,), `spacing` (3,), `direction` (3, 3) in LPS (SimpleITK's geometry of that volume) and
`segments`, a JSON object {segment number: SegmentLabel}. Exit status 1 with the reader's error on
stderr when pydicom-seg cannot read the file.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pydicom
import pydicom_seg


def main(argv: list[str]) -> int:
    seg_path, out_path = argv
    dataset = pydicom.dcmread(seg_path)
    try:
        result = pydicom_seg.MultiClassReader().read(dataset)
    except Exception as exc:  # noqa: BLE001 - the reader's refusal, reported to the test in one line
        print(f"{type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    segments = {int(number): str(info.SegmentLabel) for number, info in result.segment_infos.items()}
    np.savez(out_path, labels=result.data, origin=np.asarray(result.origin, float),
             spacing=np.asarray(result.spacing, float), direction=np.asarray(result.direction, float).reshape(3, 3),
             segments=json.dumps(segments))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
