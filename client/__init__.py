"""gRPC client of the wholebody_ct_segmentation Triton ensemble (library and `python -m client`).

Importing it loads what NIfTI in and out needs (numpy, nibabel, tritonclient): no torch or MONAI,
and no DICOM or format libraries (pydicom, highdicom, pynrrd, matplotlib), which the DICOM input and
the other outputs import when they are used.
"""

import sys


def _import_nibabel_without_pydicom() -> None:
    """Import nibabel with its optional pydicom support off, unless either is already loaded.

    `import nibabel` imports pydicom (and through it PIL and requests, ~0.15 s) whenever pydicom is
    installed, only to parse NIfTI header extensions of code 2 (DICOM) into pydicom Datasets. Without
    pydicom, nibabel documents that it keeps those extensions as raw bytes, which is all a client that
    copies the input header onto its label map needs. pydicom itself is unaffected: the DICOM input
    (`clinical.dicom_series`) imports it when a DICOM source is read.
    """
    if "nibabel" in sys.modules or "pydicom" in sys.modules:
        return
    sys.modules["pydicom"] = None  # type: ignore[assignment]  # `import pydicom` raises ImportError meanwhile
    try:
        import nibabel  # noqa: F401
    finally:
        if "pydicom" in sys.modules and sys.modules["pydicom"] is None:
            del sys.modules["pydicom"]


_import_nibabel_without_pydicom()

from client.segmentation_client import SegmentationClient, SegmentationError, SegmentationResult  # noqa: E402

__all__ = ["SegmentationClient", "SegmentationError", "SegmentationResult"]
